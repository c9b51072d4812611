"""Selective methods: train a chosen subset of the pretrained weights and freeze the rest.

Fine-tuning learns an update ΔW for the pretrained weights W, W' = W + ΔW. The selective methods differ only in
*which* entries of ΔW may be non-zero:

* **Full fine-tuning** (全量微调): every weight trains; ΔW is dense.
* **Freeze** (冻结微调; "freeze tuning" in LLaMA-Factory): only the top ``k`` transformer blocks and the task head
  train. The lower blocks, which hold the most general features, stay as pretrained (Yosinski et al., 2014, "How
  transferable are features in deep neural networks?"). ``k = 0`` trains the head alone; on BERT that "head" is
  the pooler (a d × d dense layer with tanh) and the classifier, so it is a small MLP on [CLS], not a linear probe.
* **Linear probe** (线性探测): a linear classifier on frozen features and nothing else: the classifier reads
  [CLS]'s last hidden state (``pooling="cls"``) or the mean over the real tokens (``"mean"``, for encoders trained
  with mean pooling, as sentence-transformers' MiniLM is), the pooler bypassed. The baseline every method must beat.
* **BitFit** (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
  Language-models"): only the bias terms b of y = Wx + b train (and the task head). In BERT-base that is about
  0.09 % of the parameters (notebook 03 counts it by kind). Models without biases (Llama, SmolLM2, Qwen's FFN) leave
  BitFit nothing to train.
  ``BitFitConfig(biases=...)`` trains a subset, named by the *kind* of module each bias belongs to
  (:data:`BIAS_KINDS`; :func:`bias_kinds` lists a model's): the paper's ablation trains ``("query",
  "intermediate")``, its b_q and b_m2, alone.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from peftlab.families import family_of
from peftlab.methods import layers
from peftlab.params import kind_of, layer_of, parameter_table

#: The methods of this module, by their registry names.
SELECTIVE = ("full", "freeze", "bitfit", "linear-probe")
POOLINGS = ("cls", "mean")
#: The kinds of bias vector, by the module that adds it (Ben Zaken et al.'s names for BERT in brackets): the query,
#: key and value projections (b_q, b_k, b_v), GPT-2's fused q, k, v (``qkv``), the attention output (b_m1), the FFN's
#: first projection (``intermediate``, b_m2; Llama's gate and up) and its second (``ffn_output``, b_m3), every
#: LayerNorm's β (``norm``: b_LN1, b_LN2 and the embeddings'), the pooler's and the classifier's (or a score head's),
#: and ``other`` (a bias in none of these modules).
BIAS_KINDS = ("query", "key", "value", "qkv", "attention_output", "intermediate", "ffn_output", "norm", "pooler",
              "classifier", "other")  # fmt: skip
#: A block's projections by role (:mod:`peftlab.families`) → the kind of their bias.
ROLE_KINDS = {"q": "query", "k": "key", "v": "value", "qkv": "qkv", "o": "attention_output", "gate": "intermediate",
              "up": "intermediate", "down": "ffn_output"}  # fmt: skip


@dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning: every parameter trains."""


@dataclass(frozen=True)
class FreezeConfig:
    """Train the top ``trainable_layers`` transformer blocks (and the task head when ``train_head``)."""

    trainable_layers: int = 2
    train_head: bool = True

    def __post_init__(self):
        if self.trainable_layers < 0:
            raise ValueError(f"trainable_layers must be 0 or more, got {self.trainable_layers}.")


@dataclass(frozen=True)
class BitFitConfig:
    """Train the bias vectors (and a classifier's head and pooler, whole, when ``train_head``; never a language
    model's output matrix, which is no bias and, tied, the embeddings themselves).

    ``biases``: ``None`` trains every bias; a tuple of kinds (:data:`BIAS_KINDS`) trains those alone, e.g.
    ``("query", "intermediate")`` (Ben Zaken et al.'s b_q and b_m2). A kind the model lacks is refused by
    :func:`apply`, with the model's kinds."""

    train_head: bool = True
    biases: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.biases is None:
            return
        if isinstance(self.biases, str) or not all(isinstance(kind, str) for kind in self.biases):
            raise TypeError(f"biases is a tuple of bias kinds, e.g. ('query', 'intermediate'), got {self.biases!r}.")
        biases = tuple(self.biases)
        if not biases:
            raise ValueError("biases=() selects no bias: name at least one kind, or pass None to train every bias.")
        unknown = [kind for kind in biases if kind not in BIAS_KINDS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], BIAS_KINDS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"Unknown bias kind(s) {', '.join(map(repr, unknown))}{hint}; the kinds are "
                             f"{', '.join(BIAS_KINDS)}.")  # fmt: skip
        object.__setattr__(self, "biases", biases)


@dataclass(frozen=True)
class LinearProbeConfig:
    """A linear classifier on the frozen encoder's features: [CLS]'s hidden state or the mean over the real tokens."""

    pooling: str = "cls"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {self.pooling!r}; use one of {', '.join(POOLINGS)}.")


class TokenPooling(nn.Module):
    """Stands in for BERT's pooler (dense + tanh over [CLS]) in a linear probe: the [CLS] hidden state itself, or
    the mean of the hidden states over the real tokens (the attention mask is read from the encoder's call)."""

    def __init__(self, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.attention_mask = None

    def forward(self, hidden_states):
        if self.pooling == "cls" or self.attention_mask is None:
            return hidden_states[:, 0] if self.pooling == "cls" else hidden_states.mean(dim=1)
        mask = self.attention_mask[:, : hidden_states.shape[1]].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _probe(model: nn.Module, config: LinearProbeConfig) -> None:
    """Replace the pooler by :class:`TokenPooling` and train the classifier alone (checked before any change)."""
    encoder = getattr(model, "bert", None)
    if encoder is None or getattr(encoder, "pooler", None) is None or not hasattr(model, "classifier"):
        raise ValueError(
            f"A linear probe here reads a BERT sequence classifier's features; {type(model).__name__} is not one: "
            "use FreezeConfig(trainable_layers=0) to train only the head of another model."
        )
    pooling = TokenPooling(config.pooling)

    def remember_mask(module, args, kwargs):
        pooling.attention_mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
    encoder.pooler = pooling
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks, read from the layer indices of the parameter names."""
    layers = parameter_table(model)["layer"].dropna()
    if layers.empty:
        raise ValueError(f"No transformer blocks found in {type(model).__name__} (no '...layers.N...' parameters).")
    return int(layers.max()) + 1


def _is_head(name: str, modules: dict[str, nn.Module], model: nn.Module) -> bool:
    return kind_of(name, modules.get(name.rsplit(".", 1)[0], model)) == "head"


def bias_kinds(model: nn.Module) -> dict[str, str]:
    """Every bias parameter of ``model`` by name → its kind (:data:`BIAS_KINDS`): norms and heads by
    :func:`peftlab.params.kind_of`, a block's projections by their role in the model's family
    (:mod:`peftlab.families`; another family is refused there, with the families peftlab knows)."""
    family = family_of(model, needed_by="BitFit's bias kinds")
    in_block = re.compile(rf"(?:^|\.){re.escape(family.blocks)}\.\d+\.(.+)\.bias$")
    roles = {path: ROLE_KINDS[role] for role, path in family.projections.items()}
    modules = dict(model.named_modules())
    kinds = {}
    for name, _ in model.named_parameters():
        if not name.endswith("bias"):
            continue
        kind = kind_of(name, modules.get(name.rsplit(".", 1)[0], model))
        match = in_block.search(name)
        if kind == "norm":
            kinds[name] = "norm"
        elif kind == "head":
            kinds[name] = "pooler" if "pooler" in name else "classifier"
        elif match and match.group(1) in roles:
            kinds[name] = roles[match.group(1)]
        else:
            kinds[name] = "other"
    return kinds


def _trained_biases(model: nn.Module, config: BitFitConfig) -> set[str]:
    """The names of the biases BitFit trains; a kind the model lacks is refused, with the kinds it has."""
    if config.biases is None:
        return {name for name, _ in model.named_parameters() if name.endswith("bias")}
    kinds = bias_kinds(model)
    present = [kind for kind in BIAS_KINDS if kind in kinds.values()]
    missing = [kind for kind in config.biases if kind not in present]
    if missing:
        raise ValueError(f"{type(model).__name__} has no {', '.join(map(repr, missing))} biases; its bias kinds are "
                         f"{', '.join(present)}.")  # fmt: skip
    return {name for name, kind in kinds.items() if kind in config.biases}


def apply(model: nn.Module, config: FullConfig | FreezeConfig | BitFitConfig, adapter: str = "default") -> nn.Module:
    """Set ``requires_grad`` on the parameters the method trains, and clear it on all the others. Every check runs
    before the model changes; applying another selective method replaces the choice (nothing was added)."""
    names = {FullConfig: "full", FreezeConfig: "freeze", BitFitConfig: "bitfit", LinearProbeConfig: "linear-probe"}
    if type(config) not in names:
        raise TypeError(f"selective.apply takes one of {', '.join(c.__name__ for c in names)}, got "
                        f"{type(config).__name__}.")  # fmt: skip
    applied = layers.record(model)
    if applied is not None and applied.method not in SELECTIVE:
        raise ValueError(f"This model carries {applied.method}: apply one method per model (load a fresh base model).")
    if applied is not None and "linear-probe" in (applied.method, names[type(config)]):
        raise ValueError("A linear probe replaces the pooler: apply it to a fresh model, and nothing after it.")
    if isinstance(config, LinearProbeConfig):
        _probe(model, config)
        object.__setattr__(model, "peftlab", layers.Applied("linear-probe", {adapter: config}, [adapter]))
        return model
    modules = dict(model.named_modules())
    if isinstance(config, BitFitConfig) and not any(name.endswith("bias") for name, _ in model.named_parameters()):
        raise ValueError(
            f"{type(model).__name__} has no bias parameters, so BitFit has nothing to train (Llama-style models "
            "have none): choose another method, e.g. LoRA or (IA)³."
        )
    if isinstance(config, FreezeConfig):
        blocks = num_blocks(model)
        if config.trainable_layers > blocks:
            raise ValueError(
                f"trainable_layers={config.trainable_layers}, but {type(model).__name__} has {blocks} blocks: "
                f"choose 0..{blocks}."
            )
    trained_biases = _trained_biases(model, config) if isinstance(config, BitFitConfig) else set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = {id(p) for p in output.parameters()} if output is not None else set()
    for name, param in model.named_parameters():
        head = getattr(config, "train_head", False) and _is_head(name, modules, model)
        if isinstance(config, FullConfig):
            trains = True
        elif isinstance(config, BitFitConfig):  # a task head, not a language model's output matrix
            trains = name in trained_biases or (head and id(param) not in lm_head)
        else:
            layer = layer_of(name)
            trains = (layer is not None and layer >= blocks - config.trainable_layers) or head
        param.requires_grad_(trains)
    object.__setattr__(model, "peftlab", layers.Applied(names[type(config)], {adapter: config}, [adapter]))
    return model
