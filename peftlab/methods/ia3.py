"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations — train one scaling vector per module.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning" (T-Few,
arXiv:2205.05638). Each targeted linear layer y = W x + b gets a learned vector l, initialised to ones (so the
model starts unchanged), that rescales element-wise either its output or its input:

* attention keys and values — the OUTPUT: y = l ⊙ (W x + b), l ∈ R^{d_out};
* the feed-forward down projection — the INPUT: y = W (l ⊙ x) + b, l ∈ R^{d_in}. Its input is the FFN's inner
  activation, so this is the paper's (l_ff ⊙ γ(W_1 x)) W_2.

The trainable parameters are the sum of the scaled dimensions: ``d_out`` per output-scaled module plus ``d_in``
per input-scaled one (614,400 for Llama-2-7B: 32 · (4096 + 4096 + 11008)).

Because l is diagonal, it folds into the weights, so a merged model costs nothing at inference (:func:`merge`):

* output scaling: W' = diag(l) W and b' = l ⊙ b;
* input scaling:  W' = W diag(l), and b' = b (the bias is added after W, so it is not scaled).

(GPT-2's ``Conv1D`` stores W transposed, as [in, out]: the same products act on its columns instead of its rows.)

``IA3Config`` mirrors peft's ``IA3Config`` (tests/test_ia3.py checks logits, merged
weights and counts against peft 0.21): ``target_modules`` and ``feedforward_modules`` are either names — a
module matches when its full name is the name or ends with ``"." + name`` — or one regular expression that must
match the full module name (``re.fullmatch``). Feed-forward modules get input scaling and must be among the
targets; the others get output scaling. ``None`` takes the family's default (``DEFAULT_TARGETS``):

* Llama: ``k_proj``, ``v_proj``, ``down_proj`` (feed-forward: ``down_proj``), as peft;
* GPT-2: ``c_attn``, ``mlp.c_proj`` (feed-forward: ``mlp.c_proj``), as peft. GPT-2 computes q, k and v with one
  fused ``c_attn``; like peft we scale all its 3d outputs, so queries are scaled too (a vector of 3d, not 2d, per
  block). Since q·k = Σ_i q_i k_i, scaling both q and k by l_q and l_k is the same as scaling k by l_q ⊙ l_k: the
  extra d parameters add nothing the model could not learn without them.
* BERT: ``key``, ``value`` and the FFN's ``output.dense`` (feed-forward: the FFN's ``output.dense``). The name
  ``output.dense`` also matches ``attention.output.dense``, so peft's default for BERT scales the *input* of the
  attention output projection as well; that input is softmax(QKᵀ)V, so this scaling is the same as scaling the
  values again: redundant with l_v. Here the default is a regular expression that picks the FFN's projection alone,
  as in the paper.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.models import family

_BERT_FFN_DOWN = r".*\.layer\.\d+\.output\.dense"
#: family → (target_modules, feedforward_modules).
DEFAULT_TARGETS = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": (rf".*\.attention\.self\.(key|value)|{_BERT_FFN_DOWN}", _BERT_FFN_DOWN),
}

Targets = str | tuple[str, ...]


def _as_targets(value: str | Sequence[str] | None, field: str) -> Targets | None:
    if value is None or isinstance(value, str):
        return value
    names = tuple(value)
    if not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"{field} must be a regular expression or a list of module names, got {value!r}.")
    return names


@dataclass(frozen=True)
class IA3Config:
    """Which modules get an (IA)³ vector, and which of them scale their input (see the module docstring).

    ``target_modules``, ``feedforward_modules``: module names (a tuple or list), or one regular expression (a
    str) matched against the full module name; ``None``: the family's default. ``()`` as ``feedforward_modules``
    scales every target's output.
    """

    target_modules: Targets | None = None
    feedforward_modules: Targets | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _as_targets(self.target_modules, "target_modules"))
        object.__setattr__(self, "feedforward_modules", _as_targets(self.feedforward_modules, "feedforward_modules"))
        if self.target_modules == ():
            raise ValueError("target_modules is empty: name at least one module (or None for the family's default).")
        if isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple):
            missing = [name for name in self.feedforward_modules if name not in self.target_modules]
            if missing:
                raise ValueError(
                    f"feedforward_modules {missing} are not among target_modules {list(self.target_modules)}: "
                    "a feed-forward module is a target whose input is scaled, so add them to target_modules."
                )


class IA3Scaled(nn.Module):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose output (``scale_input=False``) or input is scaled by ``ia3_l``."""

    def __init__(self, base: nn.Module, scale_input: bool):
        super().__init__()
        if not isinstance(base, nn.Linear | Conv1D):
            raise TypeError(f"(IA)³ scales nn.Linear or Conv1D layers, not {type(base).__name__}.")
        self.base = base
        self.scale_input = scale_input
        in_features, out_features = _in_out_features(base)
        features = in_features if scale_input else out_features
        self.ia3_l = nn.Parameter(torch.ones(features, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # l is already in the weights
            return self.base(x)
        if self.scale_input:
            return self.base(x * self.ia3_l)
        return self.base(x) * self.ia3_l

    def extra_repr(self) -> str:
        return f"scale_input={self.scale_input}, merged={self.merged}"


def _in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # Conv1D stores its weight as [in, out]
    return module.in_features, module.out_features


def _matches(targets: Targets, name: str) -> bool:
    """peft's rule: a regular expression must match the whole name; a name must be it or its dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def _close_names(model: nn.Module, wanted: str) -> str:
    """A hint listing the model's linear layers, nearest to ``wanted`` first."""
    layer_names = sorted({name.split(".")[-1] for name, module in model.named_modules()
                          if isinstance(module, nn.Linear | Conv1D)})  # fmt: skip
    close = difflib.get_close_matches(wanted.split(".")[-1], layer_names, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"{hint} Its linear layers are named: {', '.join(layer_names)}."


def resolve_targets(model: nn.Module, config: IA3Config) -> dict[str, bool]:
    """The modules ``config`` adapts: full name → whether its input (True) or its output (False) is scaled."""
    target_modules, feedforward_modules = config.target_modules, config.feedforward_modules
    if target_modules is None or feedforward_modules is None:
        needed_by = "(IA)³'s default targets (or pass target_modules and feedforward_modules)"
        default_targets, default_feedforward = DEFAULT_TARGETS[family(model, needed_by=needed_by)]
        target_modules = default_targets if target_modules is None else target_modules
        feedforward_modules = default_feedforward if feedforward_modules is None else feedforward_modules

    names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        if not any(_matches(target_modules, name) for name in names):
            raise ValueError(
                f"target_modules {target_modules!r} matches no module of {type(model).__name__}."
                + _close_names(model, target_modules)
            )
    else:
        for target in target_modules:
            if not any(_matches((target,), name) for name in names):
                raise ValueError(
                    f"target_modules entry {target!r} matches no module of {type(model).__name__}."
                    + _close_names(model, target)
                )
    targets = {name: _matches(feedforward_modules, name) for name in names if _matches(target_modules, name)}
    stray = [name for name in names if _matches(feedforward_modules, name) and name not in targets]
    if stray:
        raise ValueError(
            f"feedforward_modules {feedforward_modules!r} matches {stray[0]!r}, which target_modules "
            f"{target_modules!r} does not: add it to target_modules, or pass feedforward_modules=() to scale "
            "no input."
        )
    return targets


def apply(model: nn.Module, config: IA3Config) -> nn.Module:
    """Freeze the model and wrap every target in :class:`IA3Scaled`, whose vector ``ia3_l`` (ones) trains.

    Works on the meta device (``peftlab.models.meta_model``): the vectors are created where the weights are.
    """
    if not isinstance(config, IA3Config):
        raise TypeError(f"ia3.apply takes an IA3Config, got {type(config).__name__}.")
    if any(isinstance(module, IA3Scaled) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} already has (IA)³ vectors: apply (IA)³ to a fresh base model.")
    targets = resolve_targets(model, config)
    model.requires_grad_(False)
    for name, scale_input in targets.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attribute)
        if not isinstance(base, nn.Linear | Conv1D):
            raise TypeError(
                f"{name!r} is a {type(base).__name__}; (IA)³ scales nn.Linear or Conv1D layers: target the "
                "projections inside it."
            )
        setattr(parent, attribute, IA3Scaled(base, scale_input))
    return model


def _scaled_layers(model: nn.Module) -> list[IA3Scaled]:
    layers = [module for module in model.modules() if isinstance(module, IA3Scaled)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no (IA)³ vectors: call ia3.apply first.")
    return layers


def _weight_scaling(layer: IA3Scaled) -> torch.Tensor:
    """l shaped to multiply the base weight: rows or columns, for nn.Linear ([out, in]) or Conv1D ([in, out])."""
    scaled_dim = 1 if layer.scale_input else 0  # as in nn.Linear's [out, in]
    if isinstance(layer.base, Conv1D):
        scaled_dim = 1 - scaled_dim
    shape = [1, 1]
    shape[scaled_dim] = -1
    return layer.ia3_l.detach().reshape(shape)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every l into its weights: W' = diag(l) W, b' = l ⊙ b (output scaling); W' = W diag(l) (input scaling).

    The wrappers stay, marked merged, and skip the scaling; :func:`unmerge` divides it out again. While merged,
    the vectors are frozen: training them would change nothing (they are no longer in the forward pass).
    """
    layers = _scaled_layers(model)
    if any(layer.merged for layer in layers):
        raise ValueError("The (IA)³ vectors are already merged: unmerge first (merging twice would scale twice).")
    for layer in layers:
        layer.base.weight.mul_(_weight_scaling(layer))
        if not layer.scale_input and layer.base.bias is not None:
            layer.base.bias.mul_(layer.ia3_l)
        layer.merged = True
        layer.ia3_l.requires_grad_(False)
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: divide each l out of its weights (exact up to rounding; l must have no zero)."""
    layers = _scaled_layers(model)
    if not all(layer.merged for layer in layers):
        raise ValueError("The (IA)³ vectors are not merged: there is nothing to unmerge.")
    if any((layer.ia3_l == 0).any() for layer in layers):
        raise ValueError("An (IA)³ vector has a zero entry: the weights it zeroed cannot be recovered by unmerging.")
    for layer in layers:
        layer.base.weight.div_(_weight_scaling(layer))
        if not layer.scale_input and layer.base.bias is not None:
            layer.base.bias.div_(layer.ia3_l)
        layer.merged = False
        layer.ia3_l.requires_grad_(True)
    return model
