"""Soft prompts: learned vectors put in front of the input embeddings, the model itself frozen.

The input ``x`` of ``T`` tokens is embedded, ``X = E[x] ∈ R^{T×d}``; a soft prompt adds ``n`` *virtual tokens*,
vectors ``P ∈ R^{n×d}`` that are not rows of the vocabulary ``E``, and the frozen model reads ``[P; X] ∈ R^{(n+T)×d}``.
Only what produces ``P`` trains.

* **Prompt tuning** (Lester, Al-Rfou & Constant, 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
  arXiv:2104.08691): ``P`` itself is the parameter, ``n·d`` of them. Initialised at random (uniform in
  [-0.5, 0.5], as in the paper), from the embeddings of random vocabulary tokens, or from the embeddings of a text
  (e.g. a description of the task), repeated or cut to ``n`` tokens as peft does.
* **P-tuning** (Liu et al., 2021, "GPT Understands, Too", arXiv:2103.10385): ``P = f_θ(P')`` is *reparametrised*
  through a small *prompt encoder* ``f_θ`` applied to free embeddings ``P' ∈ R^{n×d}``; both ``P'`` and ``θ`` train.
  The paper's encoder is a bidirectional LSTM followed by a 2-layer MLP (``"lstm"``); peft's default is an MLP
  (``"mlp"``). The layout equals peft's ``PromptEncoder`` (same module and parameter names), so state dicts load
  across. After training, :func:`fold` computes ``P`` once and drops the encoder.

Trainable parameters, with ``h`` the encoder's hidden size (default ``d``) and ``ℓ`` the LSTM's layers:

* prompt tuning: ``n·d``
* P-tuning, MLP ``d→h→h→d`` (ReLU between): ``n·d + (d·h + h) + (h·h + h) + (h·d + d)``
* P-tuning, bi-LSTM + MLP ``2h→2h→d``: ``n·d + 2·Σ_layers (4h·(i + h) + 8h) + (2h·2h + 2h) + (2h·d + d)``, with the
  layer's input width ``i = d`` for the first layer and ``2h`` for the others (two bias vectors per gate, as torch).

What the wrapper does, as peft 0.21 does: the attention mask gets ``n`` ones in front; for causal LMs the labels get
``n`` times ``-100`` in front (no loss on virtual tokens), so the returned logits have ``n + T`` positions (the real
tokens are ``logits[:, n:]``); BERT's ``token_type_ids`` get ``n`` zeros. Positions are numbered from the first
virtual token, so a model with learned absolute positions (BERT, GPT-2) has ``n`` fewer left for the text, and BERT's
pooler (which reads position 0, normally ``[CLS]``) reads the first virtual token. A fresh classification head
trains (``train_head=None``, the default: the one decision every method makes, as peft's ``SEQ_CLS``).

A wrapped causal LM generates as its base does (:meth:`VirtualTokenModel.generate`, the same arguments), with the
soft prompt in front of the input; ``with peftlab.methods.disabled(model)`` runs the base alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from peftlab.families import family_of
from peftlab.methods import layers, targets
from peftlab.methods.layers import DEFAULT_ADAPTER, ModelWrapper

INITS = ("random", "vocab", "text")
ENCODERS = ("mlp", "lstm")


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
def _check_virtual_tokens(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_virtual_tokens must be an integer of at least 1, got {n!r}.")


@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning: ``num_virtual_tokens`` learned vectors in front of the input embeddings.

    ``init``: ``"random"`` (uniform in [-0.5, 0.5]), ``"vocab"`` (embeddings of random vocabulary tokens) or
    ``"text"`` (the embeddings of ``init_token_ids``, the tokens of ``init_text``: build it with
    :meth:`from_text`; a shorter text is repeated to ``n`` tokens, as peft does; a longer one is refused, where
    peft keeps its first ``n`` tokens without a word). ``train_head``: train a classifier's head (``classifier`` /
    ``score``) too; ``None`` (the default) does where there is one, as every method does.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None
    train_head: bool | None = None

    def __post_init__(self):
        _check_virtual_tokens(self.num_virtual_tokens)
        if self.init not in INITS:
            raise ValueError(f"Unknown init {self.init!r}; use one of {', '.join(map(repr, INITS))}.")
        if self.init == "text" and not self.init_token_ids:
            raise ValueError(
                'init="text" needs the text\'s tokens: build the config with '
                "PromptTuningConfig.from_text(text, tokenizer, ...) (or use init='random' or 'vocab')."
            )
        if self.init != "text" and (self.init_text is not None or self.init_token_ids is not None):
            raise ValueError(f'init_text is only read with init="text", but init={self.init!r}: set init="text".')
        if self.init_token_ids is not None:
            object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))
            if len(self.init_token_ids) > self.num_virtual_tokens:
                raise ValueError(
                    f"init_text is {len(self.init_token_ids)} tokens long, more than the {self.num_virtual_tokens} "
                    f"virtual tokens: its last {len(self.init_token_ids) - self.num_virtual_tokens} tokens would be "
                    f"dropped (peft drops them silently). Shorten the text or use num_virtual_tokens="
                    f"{len(self.init_token_ids)}."
                )

    @classmethod
    def from_text(cls, text: str, tokenizer, num_virtual_tokens: int = 20, **fields) -> PromptTuningConfig:
        """Initialise the prompt from the embeddings of ``text`` (e.g. a description of the task), tokenised by
        the model's own tokenizer (a text of another vocabulary is refused by :func:`apply`)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"init_text must be a non-empty text, got {text!r}.")
        ids = tuple(tokenizer(text)["input_ids"])
        if not ids:
            raise ValueError(f"The tokenizer turned init_text={text!r} into no tokens: use another text.")
        return cls(num_virtual_tokens, init="text", init_text=text, init_token_ids=ids, **fields)


@dataclass(frozen=True)
class PTuningConfig:
    """P-tuning: virtual tokens computed by a prompt encoder (``"mlp"``, peft's default, or ``"lstm"``, the paper's).

    ``encoder_hidden_size`` is the encoder's width ``h`` (``None``: the model's hidden size ``d``, as peft);
    ``lstm_layers`` the depth of the bi-LSTM (peft's default 2; ignored by the MLP, which has exactly 3 linear layers).
    """

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    lstm_layers: int = 2
    train_head: bool | None = None

    def __post_init__(self):
        _check_virtual_tokens(self.num_virtual_tokens)
        if self.encoder not in ENCODERS:
            raise ValueError(f"Unknown encoder {self.encoder!r}; use one of {', '.join(map(repr, ENCODERS))}.")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"encoder_hidden_size must be at least 1 (or None for d), got {self.encoder_hidden_size}.")
        if self.lstm_layers < 1:
            raise ValueError(f"lstm_layers must be at least 1, got {self.lstm_layers}.")


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared with the prefix methods
# ----------------------------------------------------------------------------------------------------------------
def classification_head(model: nn.Module) -> nn.Module | None:
    """The task head of a sequence classifier (a child named ``classifier`` or ``score``), else ``None``."""
    name = targets.task_head(model)
    return getattr(model, name) if name else None


def resolve_train_head(model: nn.Module, config):
    """``config`` with ``train_head`` decided (``None``: train a classifier's new head, as every method does)."""
    if config.train_head is None:
        return dataclasses.replace(config, train_head=classification_head(model) is not None)
    if config.train_head and classification_head(model) is None:
        raise ValueError(
            f"train_head=True, but {type(model).__name__} has no classification head (a child named "
            f"{' or '.join(map(repr, targets.TASK_HEADS))}): set train_head=False (or leave it None)."
        )
    return config


def check_base(model: nn.Module, method: str) -> None:
    """Refuse what the wrappers cannot take: not a transformers model, an already adapted one, an encoder-decoder,
    a family peftlab does not know."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"{method} takes a transformers model (PreTrainedModel), got {type(model).__name__}: apply it to the base "
            "model, not to an already wrapped one."
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{method} here supports encoders and decoders, not encoder-decoders ({type(model).__name__})."
        )
    if (applied := layers.record(model)) is not None:
        raise ValueError(f"This model already carries {applied.method}: apply one method per model.")
    family_of(model, needed_by=method)


def freeze(model: nn.Module, train_head: bool = False) -> None:
    """``requires_grad = False`` on every parameter of the base, then ``True`` on its classification head if asked."""
    head = classification_head(model) if train_head else None
    model.requires_grad_(False)
    if head is not None:
        head.requires_grad_(True)


def check_positions(config, num_virtual_tokens: int, length: int) -> None:
    """The virtual tokens take ``n`` positions: refuse ``n + length`` past ``max_position_embeddings`` before the
    first forward. Learned absolute positions (BERT, GPT-2) would fail deep inside with an index error; rotary ones
    (Llama, SmolLM2) would run on, at positions the model never saw in training."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and num_virtual_tokens + length > limit:
        learned = family_of(config).positions == "learned"
        why = "its learned position table ends there" if learned else "it was never trained past that position"
        raise ValueError(
            f"{num_virtual_tokens} virtual tokens + {length} input tokens = {num_virtual_tokens + length} positions, "
            f"but {config.model_type} has max_position_embeddings={limit} ({why}): use shorter inputs or fewer "
            "virtual tokens."
        )


# ----------------------------------------------------------------------------------------------------------------
# The prompt encoder of P-tuning
# ----------------------------------------------------------------------------------------------------------------
class PromptEncoder(nn.Module):
    """``P = f_θ(P')``: free embeddings ``P' ∈ R^{n×d}`` through a bi-LSTM + MLP head, or through an MLP.

    ``"lstm"``: ``P = W_2 ReLU(W_1 [LSTM→(P'); LSTM←(P')] + b_1) + b_2`` (Liu et al., 2021, eq. 3).
    ``"mlp"``: ``P = W_3 ReLU(W_2 ReLU(W_1 P' + b_1) + b_2) + b_3``. Same names and shapes as peft's PromptEncoder.
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden_size: int, encoder: str, lstm_layers: int = 2):
        super().__init__()
        self.encoder = encoder
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                token_dim, hidden_size, num_layers=lstm_layers, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, token_dim)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden_size), nn.ReLU(),
                nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                nn.Linear(hidden_size, token_dim),
            )  # fmt: skip

    def forward(self) -> torch.Tensor:
        """The virtual token embeddings, ``(n, d)``."""
        free = self.embedding.weight
        if self.encoder == "lstm":
            return self.mlp_head(self.lstm_head(free.unsqueeze(0))[0]).squeeze(0)
        return self.mlp_head(free)


# ----------------------------------------------------------------------------------------------------------------
# The wrappers
# ----------------------------------------------------------------------------------------------------------------
class VirtualTokenModel(ModelWrapper):
    """A frozen model that reads ``[P; X]``: subclasses say where ``P`` (``(n, d)``) comes from."""

    def __init__(self, base_model: PreTrainedModel, num_virtual_tokens: int):
        super().__init__(base_model)
        self.num_virtual_tokens = num_virtual_tokens
        #: Causal LMs (models that generate) predict every token: their labels get -100 for the virtual tokens.
        self.is_causal_lm = isinstance(base_model, GenerationMixin)

    def prompt(self) -> torch.Tensor:
        raise NotImplementedError

    def _with_prompt(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None):
        """``[P; X]`` and its attention mask (``n`` ones in front)."""
        batch, length = inputs_embeds.shape[:2]
        check_positions(self.config, self.num_virtual_tokens, length)
        prompt = self.prompt().to(inputs_embeds.dtype).expand(batch, -1, -1)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
        return torch.cat([prompt, inputs_embeds], dim=1), torch.cat([ones, attention_mask], dim=1)

    def forward(
        self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, token_type_ids=None, **kwargs
    ):
        """The base model on ``[P; X]``; the same arguments and output as the base (logits cover ``n + T`` tokens).
        Switched off (:func:`~peftlab.methods.disabled`), the base model alone."""
        if not self.enabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   inputs_embeds=inputs_embeds, token_type_ids=token_type_ids, **kwargs)  # fmt: skip
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if kwargs.get("position_ids") is not None:
            raise ValueError("Leave position_ids out: with virtual tokens in front the model numbers positions itself.")
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        batch, n = inputs_embeds.shape[0], self.num_virtual_tokens
        inputs_embeds, attention_mask = self._with_prompt(inputs_embeds, attention_mask)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], dim=1)
        if labels is not None and self.is_causal_lm:
            labels = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The base model's ``generate`` with the soft prompt in front: the same arguments, and the same output
        (the input ids followed by the new tokens, one row per returned sequence)."""
        if not self.is_causal_lm:
            raise TypeError(f"{type(self.base_model).__name__} is not a causal LM: it has nothing to generate.")
        if not self.enabled:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds = self.base_model.get_input_embeddings()(input_ids)
        inputs_embeds, attention_mask = self._with_prompt(embeds, attention_mask)
        new = self.base_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids.repeat_interleave(new.shape[0] // input_ids.shape[0], dim=0), new], dim=1)


class PromptTunedModel(VirtualTokenModel):
    """Prompt tuning: ``P`` is the parameter ``soft_prompt`` (``n × d``, fp32)."""

    def __init__(self, base_model: PreTrainedModel, soft_prompt: torch.Tensor):
        super().__init__(base_model, soft_prompt.shape[0])
        self.soft_prompt = nn.Parameter(soft_prompt)

    def prompt(self) -> torch.Tensor:
        return self.soft_prompt


class PTunedModel(VirtualTokenModel):
    """P-tuning: ``P = prompt_encoder()``."""

    def __init__(self, base_model: PreTrainedModel, prompt_encoder: PromptEncoder):
        super().__init__(base_model, prompt_encoder.embedding.num_embeddings)
        self.prompt_encoder = prompt_encoder

    def prompt(self) -> torch.Tensor:
        return self.prompt_encoder()


# ----------------------------------------------------------------------------------------------------------------
# apply and the closed-form counts
# ----------------------------------------------------------------------------------------------------------------
def initial_prompt(word_embeddings: nn.Embedding, config: PromptTuningConfig) -> torch.Tensor:
    """The ``n × d`` starting value of the soft prompt (fp32, on the embeddings' device), as ``config.init`` says."""
    n, weight = config.num_virtual_tokens, word_embeddings.weight
    if config.init == "random":
        return torch.empty(n, weight.shape[1], device=weight.device).uniform_(-0.5, 0.5)
    if config.init == "vocab":
        token_ids = torch.randint(0, weight.shape[0], (n,))
    else:
        ids = list(config.init_token_ids)
        if max(ids) >= weight.shape[0] or min(ids) < 0:
            raise ValueError(
                f"init_text's token ids reach {max(ids)}, but the model's vocabulary has {weight.shape[0]} tokens: "
                "the text was tokenised with another model's tokenizer. Use this model's tokenizer in from_text."
            )
        token_ids = torch.tensor((ids * math.ceil(n / len(ids)))[:n])
    return weight.detach()[token_ids.to(weight.device)].clone().float()


def apply(model: PreTrainedModel, config: PromptTuningConfig | PTuningConfig,
          adapter: str = DEFAULT_ADAPTER) -> VirtualTokenModel:  # fmt: skip
    """Freeze ``model`` and return it wrapped with a soft prompt (prompt tuning) or a prompt encoder (P-tuning).

    Every check runs before the model changes. Works on models on the meta device. One prompt per model.
    """
    if not isinstance(config, PromptTuningConfig | PTuningConfig):
        raise TypeError(f"prompt.apply takes PromptTuningConfig or PTuningConfig, got {type(config).__name__}.")
    layers.check_adapter_name(adapter)
    check_base(model, "prompt.apply")
    config = resolve_train_head(model, config)  # raises, saying what to change, for a head that is not there
    word_embeddings = model.get_input_embeddings()
    if isinstance(config, PromptTuningConfig):
        soft_prompt = initial_prompt(word_embeddings, config)
        freeze(model, config.train_head)
        wrapped = PromptTunedModel(model, soft_prompt)
        method = "prompt"
    else:
        d = word_embeddings.embedding_dim
        with torch.device(word_embeddings.weight.device):
            encoder = PromptEncoder(
                config.num_virtual_tokens, d, config.encoder_hidden_size or d, config.encoder, config.lstm_layers
            )
        freeze(model, config.train_head)
        wrapped = PTunedModel(model, encoder)
        method = "ptuning"
    layers.remember(wrapped, method, adapter, config)
    return wrapped


def fold(model: PTunedModel) -> PromptTunedModel:
    """After P-tuning, compute ``P = f_θ(P')`` once and drop the encoder: a prompt-tuned model with the same outputs.

    Returns a new wrapper around the same base model (``n·d`` parameters instead of the encoder's).
    """
    if not isinstance(model, PTunedModel):
        raise TypeError(
            f"fold takes the PTunedModel that apply(model, PTuningConfig(...)) returned, got {type(model).__name__}."
        )
    with torch.no_grad():
        soft_prompt = model.prompt().detach().clone()
    applied = layers.record(model)
    folded = PromptTunedModel(model.base_model, soft_prompt).train(model.training)
    config = PromptTuningConfig(model.num_virtual_tokens, train_head=applied.config.train_head)
    layers.remember(folded, "prompt", applied.active[0], config)
    return folded


def closed_form_count(model: nn.Module, config: PromptTuningConfig | PTuningConfig) -> int:
    """Parameters the method adds (see the module docstring), head not included; ``d`` from ``model``'s embeddings."""
    n, d = config.num_virtual_tokens, model.get_input_embeddings().embedding_dim
    if isinstance(config, PromptTuningConfig):
        return n * d
    h = config.encoder_hidden_size or d
    if config.encoder == "mlp":
        return n * d + (d * h + h) + (h * h + h) + (h * d + d)
    lstm = sum(2 * (4 * h * ((d if layer == 0 else 2 * h) + h) + 8 * h) for layer in range(config.lstm_layers))
    return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
