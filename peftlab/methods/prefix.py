"""Prefixes: learned keys and values in front of every attention layer's own, the model itself frozen.

Attention in layer ``ℓ`` reads keys ``K`` and values ``V`` of the ``T`` tokens; a prefix of ``n`` virtual tokens adds
learned ``P_k^ℓ, P_v^ℓ ∈ R^{n × d_kv}`` (``d_kv = n_kv_heads · head_dim``) in front of them, per head ``i``:

    head_i = softmax(Q_i [P_k,i^ℓ; K_i]ᵀ / √head_dim) [P_v,i^ℓ; V_i]

so every token can attend to ``n`` learned slots in every layer (prompt tuning only touches the input).
Trainable: ``L·2·n·d_kv`` for ``L`` layers.

* **Prefix tuning** (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
  arXiv:2101.00190). Training the prefix directly is unstable, so it is *reparametrised*: the ``n`` rows of
  ``[P_k^1, P_v^1, …, P_k^L, P_v^L] = W_2 tanh(W_1 E + b_1) + b_2`` come from free embeddings ``E ∈ R^{n×e}``
  through an MLP of width ``h``; trainable ``n·e + e·h + h + h·2L·d_kv + 2L·d_kv`` (``e = d`` by default). After
  training the MLP is computed once and dropped (:func:`fold`): inference keeps ``L·2·n·d_kv``.
* **P-tuning v2** (Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally
  Across Scales and Tasks", arXiv:2110.07602): the same *deep prompts* without reparametrisation, with a trainable
  linear classification head on the encoder (no verbalizer).

How the prefix gets in (transformers 5, as peft 0.21 does): it is the model's KV cache, a
``transformers.DynamicCache`` holding per layer a key and a value of shape ``(batch, n_kv_heads, n, head_dim)``
(grouped-query attention stores ``n_kv_heads < n_heads`` heads); every forward gets a fresh cache, since the model
appends the real keys to it. The cache's keyword is ``cache`` from transformers 5.24 on and ``past_key_values``
before (:func:`peftlab.compat.cache_keyword` reads it from the model's signature). The attention mask gets ``n``
ones in front; the labels stay as they are (the virtual tokens are not in the sequence, the logits have ``T``
positions). The model numbers the real tokens from ``n`` (it reads the cache length): Llama's rotary positions
start at ``n`` (the prefix keys themselves are not rotated), BERT's and GPT-2's learned positions start at ``n``
too, which leaves ``n`` fewer of them for the text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from peftlab import compat
from peftlab.methods import layers
from peftlab.methods.layers import DEFAULT_ADAPTER, ModelWrapper
from peftlab.methods.prompt import check_base, check_positions, freeze, resolve_train_head


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
def _check_virtual_tokens(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_virtual_tokens must be an integer of at least 1, got {n!r}.")


@dataclass(frozen=True)
class PrefixTuningConfig:
    """Prefix tuning: ``num_virtual_tokens`` keys and values per layer, through an MLP when ``reparametrize``.

    ``hidden_size`` is the MLP's width ``h`` (Li & Liang: 512); ``embedding_dim`` the width ``e`` of its input rows
    (``None``: the model's hidden size ``d``, as Li & Liang; peft 0.21 uses ``d_kv``, which differs under grouped-query
    attention). Both are ignored without ``reparametrize``. ``train_head``: train a classifier's head too; ``None``
    (the default) does where there is one.
    """

    num_virtual_tokens: int = 20
    reparametrize: bool = True
    hidden_size: int = 512
    embedding_dim: int | None = None
    train_head: bool | None = None

    def __post_init__(self):
        _check_virtual_tokens(self.num_virtual_tokens)
        if self.hidden_size < 1:
            raise ValueError(
                f"hidden_size (the reparametrisation MLP's width) must be at least 1, got {self.hidden_size}."
            )
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be at least 1 (or None for d), got {self.embedding_dim}.")


@dataclass(frozen=True)
class PTuningV2Config:
    """P-tuning v2: deep prompts (a prefix in every layer, no MLP) and the classification head trains too."""

    num_virtual_tokens: int = 20
    train_head: bool | None = None

    def __post_init__(self):
        _check_virtual_tokens(self.num_virtual_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVShape:
    """What a prefix must look like for a model: per layer a key and a value of ``n_kv_heads × head_dim``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_dim(self) -> int:
        """``d_kv = n_kv_heads · head_dim`` (``= d`` without grouped-query attention)."""
        return self.num_kv_heads * self.head_dim


def kv_shape(model_config) -> KVShape:
    """The prefix shape of a model, from its config (``n_kv_heads`` keys and values per layer)."""
    heads = model_config.num_attention_heads
    return KVShape(
        num_layers=model_config.num_hidden_layers,
        num_kv_heads=getattr(model_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(model_config, "head_dim", None) or model_config.hidden_size // heads,
        hidden_size=model_config.hidden_size,
    )


# ----------------------------------------------------------------------------------------------------------------
# The prefix encoder and the wrapper
# ----------------------------------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """The prefix as an ``(n, 2·L·d_kv)`` matrix: stored (``transform`` is ``None``) or ``transform(embedding)``.

    Row ``j`` holds virtual token ``j``'s key and value for every layer, laid out ``[layer][key, value][head][dim]``.
    Same names and layout as peft's PrefixEncoder. State dicts load across as they are for the direct prefix; for the
    MLP only with ``embedding_dim = d_kv`` and the same hidden width (peft's ``token_dim`` and ``encoder_hidden_size``,
    both ``d_kv`` by default, where peftlab's embedding defaults to ``d``).
    """

    def __init__(self, num_virtual_tokens: int, prefix_dim: int, embedding_dim: int | None, hidden_size: int | None):
        super().__init__()
        if hidden_size is None:
            self.embedding = nn.Embedding(num_virtual_tokens, prefix_dim)
            self.transform = None
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, embedding_dim)
            self.transform = nn.Sequential(
                nn.Linear(embedding_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, prefix_dim)
            )

    def forward(self) -> torch.Tensor:
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)


class PrefixTunedModel(ModelWrapper):
    """A frozen model whose every attention layer also reads the prefix (fed as the model's KV cache)."""

    def __init__(self, base_model: PreTrainedModel, prefix_encoder: PrefixEncoder, shape: KVShape):
        super().__init__(base_model)
        self.prefix_encoder = prefix_encoder
        self.shape = shape
        self.num_virtual_tokens = prefix_encoder.embedding.num_embeddings

    def past_key_values(self, batch_size: int) -> DynamicCache:
        """A fresh cache holding the prefix: per layer key and value ``(batch, n_kv_heads, n, head_dim)``."""
        s, n = self.shape, self.num_virtual_tokens
        dtype = self.base_model.get_input_embeddings().weight.dtype
        prefix = self.prefix_encoder().to(dtype).view(n, s.num_layers, 2, s.num_kv_heads, s.head_dim)
        per_layer = prefix.permute(1, 2, 3, 0, 4)  # (L, key/value, n_kv_heads, n, head_dim)
        return DynamicCache(
            [(key.expand(batch_size, -1, -1, -1), value.expand(batch_size, -1, -1, -1)) for key, value in per_layer]
        )

    def _prefix_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([attention_mask.new_ones(attention_mask.shape[0], self.num_virtual_tokens), attention_mask], 1)

    def forward(
        self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, position_ids=None, **kwargs
    ):
        """The base model with the prefix in every layer; the same arguments and output as the base. Switched off
        (:func:`~peftlab.methods.disabled`), the base model alone."""
        if not self.enabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   inputs_embeds=inputs_embeds, position_ids=position_ids, **kwargs)  # fmt: skip
        if self.base_model.training and torch.is_grad_enabled() and _checkpointed(self.base_model):
            raise ValueError(
                "Gradient checkpointing was turned on after prefix.apply: a checkpointed layer of transformers drops "
                "the KV cache in training (the backward pass recomputes the layer, which would write to the cache "
                "twice), and the prefix travels in that cache, so it would be lost (no gradient reaches it) or no "
                "longer match the attention mask. Turn checkpointing off to train the prefix (model.base_model."
                "activation_checkpointing_disable(); gradient_checkpointing_disable() before transformers 5.2x); "
                "a forward pass in eval() mode or without gradients works either way."
            )
        return self._with_prefix(self.base_model, input_ids, attention_mask, labels, inputs_embeds, position_ids,
                                 **kwargs)  # fmt: skip

    def _with_prefix(self, run, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                     position_ids=None, **kwargs):  # fmt: skip
        """``run`` (the base model, or its own forward) with a fresh prefix cache and the mask that covers it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        check_positions(self.config, self.num_virtual_tokens, length)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if attention_mask is None:  # BERT sizes its mask from this one: it must cover the prefix too
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if position_ids is not None:  # the real tokens come after the prefix
            kwargs["position_ids"] = position_ids + self.num_virtual_tokens
        return run(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=self._prefix_mask(attention_mask),
            labels=labels,
            **{compat.cache_keyword(self.base_model): self.past_key_values(batch)},
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The base model's ``generate`` with the prefix in every layer: the same arguments and output.

        The prefix goes in front as ``n`` placeholder tokens: with the KV cache (the default), ``generate`` gets the
        prefix as a filled cache for them, treats them as already seen and never embeds them, so the real tokens
        are numbered from ``n``, as in training. Without it (``use_cache=False``), every step runs the whole
        sequence through :meth:`forward` with a fresh prefix instead. The placeholders are cut from the output.
        """
        if not hasattr(self.base_model, "generate"):
            raise TypeError(f"{type(self.base_model).__name__} is not a causal LM: it has nothing to generate.")
        if not self.enabled:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n, batch = self.num_virtual_tokens, input_ids.shape[0]
        check_positions(self.config, n, input_ids.shape[1] + kwargs.get("max_new_tokens", 0))
        placeholders = input_ids.new_full((batch, n), self.config.pad_token_id or 0)
        inputs = {"input_ids": torch.cat([placeholders, input_ids], dim=1), "attention_mask": self._prefix_mask(
            attention_mask)}  # fmt: skip
        if kwargs.get("use_cache", True):
            # generate repeats each input for beams and several returns, but not a cache given to it
            settings = kwargs.get("generation_config") or self.base_model.generation_config
            repeats = max(kwargs.get("num_beams", settings.num_beams) or 1,
                          kwargs.get("num_return_sequences", settings.num_return_sequences) or 1)  # fmt: skip
            kwargs.setdefault(compat.cache_keyword(self.base_model), self.past_key_values(batch * repeats))
            return self.base_model.generate(**inputs, **kwargs)[:, n:]
        own_forward = self.base_model.forward

        @functools.wraps(own_forward)  # generate reads the signature to choose what to pass
        def each_step(input_ids, attention_mask=None, position_ids=None, **step):
            """The whole sequence so far, placeholders in front: drop them, and run it through a fresh prefix."""
            kept = {k: v for k, v in step.items() if k not in ("cache_position", "use_cache", "cache",
                                                                  "past_key_values")}  # fmt: skip
            if attention_mask is None:  # left out when it is all ones: the input's, then the new tokens, attended
                rows, new = input_ids.shape[0], input_ids.shape[1] - inputs["input_ids"].shape[1]
                given = inputs["attention_mask"].repeat_interleave(rows // batch, dim=0)  # beams, several returns
                attention_mask = torch.cat([given, given.new_ones(rows, new)], dim=1)
            if position_ids is not None:  # numbered from the mask, placeholders included: the real tokens from n
                position_ids = position_ids[:, n:] - n
            return self._with_prefix(own_forward, input_ids[:, n:], attention_mask[:, n:], position_ids=position_ids,
                                     **kept)  # fmt: skip

        self.base_model.forward = each_step
        try:
            return self.base_model.generate(**inputs, **kwargs)[:, n:]
        finally:
            del self.base_model.forward


# ----------------------------------------------------------------------------------------------------------------
# apply, fold and the closed-form counts
# ----------------------------------------------------------------------------------------------------------------
def apply(model: PreTrainedModel, config: PrefixTuningConfig | PTuningV2Config,
          adapter: str = DEFAULT_ADAPTER) -> PrefixTunedModel:  # fmt: skip
    """Freeze ``model`` and return it wrapped with a trainable prefix in every layer. Every check runs before the
    model changes. Works on the meta device. One prefix per model."""
    if not isinstance(config, PrefixTuningConfig | PTuningV2Config):
        raise TypeError(f"prefix.apply takes PrefixTuningConfig or PTuningV2Config, got {type(config).__name__}.")
    layers.check_adapter_name(adapter)
    check_base(model, "prefix.apply")
    shape = kv_shape(model.config)
    compat.cache_keyword(model)  # raises, before anything changes, for a model that takes no KV cache
    if _checkpointed(model):
        raise ValueError("The prefix travels in the KV cache, which gradient checkpointing drops: turn it off first.")
    config = resolve_train_head(model, config)  # raises, saying what to change, for a head that is not there
    reparametrize = isinstance(config, PrefixTuningConfig) and config.reparametrize
    with torch.device(model.get_input_embeddings().weight.device):
        encoder = PrefixEncoder(
            config.num_virtual_tokens,
            prefix_dim=2 * shape.num_layers * shape.kv_dim,
            embedding_dim=(config.embedding_dim or shape.hidden_size) if reparametrize else None,
            hidden_size=config.hidden_size if reparametrize else None,
        )
    freeze(model, config.train_head)
    wrapped = PrefixTunedModel(model, encoder, shape)
    layers.remember(wrapped, "ptuning-v2" if isinstance(config, PTuningV2Config) else "prefix", adapter, config)
    return wrapped


def _checkpointed(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has transformers' gradient checkpointing switched on."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def fold(model: PrefixTunedModel) -> PrefixTunedModel:
    """Replace the reparametrisation MLP by the prefix it computes, ``P = MLP(E)``: same outputs, fewer parameters.

    In place, and returns ``model``; a model without MLP is returned as it is. The folded prefix keeps training
    when the embedding did (it is then P-tuning v2 / prefix tuning without reparametrisation).
    """
    if not isinstance(model, PrefixTunedModel):
        raise TypeError(f"fold takes the PrefixTunedModel that prefix.apply returned, got {type(model).__name__}.")
    encoder = model.prefix_encoder
    if encoder.transform is None:
        return model
    trains = encoder.embedding.weight.requires_grad
    with torch.no_grad():
        prefix = encoder().detach().clone()
    encoder.embedding = nn.Embedding.from_pretrained(prefix, freeze=not trains)
    encoder.transform = None
    return model


def closed_form_count(model: nn.Module, config: PrefixTuningConfig | PTuningV2Config) -> int:
    """Parameters the method adds (see the module docstring), head not included; shapes from ``model.config``."""
    shape = kv_shape(model.config)
    n, prefix_dim = config.num_virtual_tokens, 2 * shape.num_layers * shape.kv_dim
    if isinstance(config, PTuningV2Config) or not config.reparametrize:
        return n * prefix_dim
    e, h = config.embedding_dim or shape.hidden_size, config.hidden_size
    return n * e + e * h + h + h * prefix_dim + prefix_dim
