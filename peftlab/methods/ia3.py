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
targets; the others get output scaling. ``None`` takes the family's default (``peftlab.families``):

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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.families import family_of
from peftlab.methods import layers, targets
from peftlab.methods.layers import DEFAULT_ADAPTER, AdapterLayer
from peftlab.methods.targets import LINEAR

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
    scales every target's output. ``modules_to_save`` train in full (peft's field); ``None``: a classifier's new
    head, as every method does.
    """

    target_modules: Targets | None = None
    feedforward_modules: Targets | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _as_targets(self.target_modules, "target_modules"))
        object.__setattr__(self, "feedforward_modules", _as_targets(self.feedforward_modules, "feedforward_modules"))
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", targets.check_names(self.modules_to_save))
        if self.target_modules == ():
            raise ValueError("target_modules is empty: name at least one module (or None for the family's default).")
        if isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple):
            missing = [name for name in self.feedforward_modules if name not in self.target_modules]
            if missing:
                raise ValueError(
                    f"feedforward_modules {missing} are not among target_modules {list(self.target_modules)}: "
                    "a feed-forward module is a target whose input is scaled, so add them to target_modules."
                )


class IA3Scaled(AdapterLayer):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose output (``scale_input=False``) or input is scaled by the active
    adapters' vectors ``ia3_l[name]`` (several active vectors multiply)."""

    method = "(IA)³"

    def __init__(self, base_layer: nn.Module, scale_input: bool):
        if not isinstance(base_layer, LINEAR):
            raise TypeError(f"(IA)³ scales nn.Linear or Conv1D layers, not {type(base_layer).__name__}.")
        super().__init__(base_layer)
        self.scale_input = scale_input
        self.in_features, self.out_features = targets.in_out(base_layer)
        self.ia3_l = nn.ParameterDict()

    def add(self, adapter: str) -> None:
        """A vector of ones: the model starts unchanged."""
        self._added(adapter)
        features = self.in_features if self.scale_input else self.out_features
        self.ia3_l[adapter] = nn.Parameter(torch.ones(features, **layers.placement(self.base_layer)))

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return [self.ia3_l[adapter]]

    def scaling(self, adapters: list[str]) -> torch.Tensor | None:
        """The product of the given adapters' vectors (``None`` for none)."""
        vectors = [self.ia3_l[adapter] for adapter in adapters]
        if not vectors:
            return None
        product = vectors[0]
        for vector in vectors[1:]:
            product = product * vector
        return product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scaling(self.applied())
        if scale is None:
            return self.base_layer(x)
        if self.scale_input:
            return self.base_layer(x * scale)
        return self.base_layer(x) * scale

    def _weight_scaling(self, vector: torch.Tensor) -> torch.Tensor:
        """l shaped to multiply the base weight: rows or columns, for nn.Linear ([out, in]) or Conv1D ([in, out])."""
        scaled_dim = 1 if self.scale_input else 0  # as in nn.Linear's [out, in]
        if self.fan_in_fan_out:
            scaled_dim = 1 - scaled_dim
        shape = [1, 1]
        shape[scaled_dim] = -1
        return vector.detach().reshape(shape)

    @property
    def fan_in_fan_out(self) -> bool:
        return not isinstance(self.base_layer, nn.Linear)  # GPT-2's Conv1D stores its weight as [in, out]

    @torch.no_grad()
    def merge(self) -> None:
        """W' = diag(l) W, b' = l ⊙ b (output scaling); W' = W diag(l) (input scaling), for the active vectors.
        While merged, the vectors are frozen: training them would change nothing (they are no longer applied)."""
        if self.merged:
            raise ValueError("The (IA)³ vectors are already merged: unmerge first (merging twice would scale twice).")
        scale = self.scaling(self.active)
        self.base_layer.weight.mul_(self._weight_scaling(scale))
        if not self.scale_input and self.base_layer.bias is not None:
            self.base_layer.bias.mul_(scale)
        self.merged = list(self.active)
        for adapter in self.merged:
            self.ia3_l[adapter].requires_grad_(False)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged vectors out again (exact up to rounding; l must have no zero)."""
        if not self.merged:
            raise ValueError("The (IA)³ vectors are not merged: there is nothing to unmerge.")
        scale = self.scaling(self.merged)
        if (scale == 0).any():
            raise ValueError(
                "An (IA)³ vector has a zero entry: the weights it zeroed cannot be recovered by unmerging."
            )
        self.base_layer.weight.div_(self._weight_scaling(scale))
        if not self.scale_input and self.base_layer.bias is not None:
            self.base_layer.bias.div_(scale)
        for adapter in self.merged:
            self.ia3_l[adapter].requires_grad_(True)
        self.merged = []

    def describe(self) -> dict:
        return {"ia3": ("input" if self.scale_input else "output")} if self.applied() else {}

    def extra_repr(self) -> str:
        return f"scale_input={self.scale_input}, adapters={self.adapter_names}, merged={self.merged}"


def resolve_targets(model: nn.Module, config: IA3Config) -> dict[str, bool]:
    """The modules ``config`` adapts: full name → whether its input (True) or its output (False) is scaled. Every
    error is raised here, before anything changes."""
    target_modules, feedforward_modules = config.target_modules, config.feedforward_modules
    if target_modules is None or feedforward_modules is None:
        family = family_of(model, needed_by="(IA)³'s default targets (or pass target_modules and feedforward_modules)")
        target_modules = family.ia3_targets if target_modules is None else target_modules
        feedforward_modules = family.ia3_feedforward if feedforward_modules is None else feedforward_modules
    modules = targets.candidates(model)
    for wanted in [target_modules] if isinstance(target_modules, str) else [(name,) for name in target_modules]:
        if not any(targets.matches(name, wanted) for name in modules):
            raise targets.nothing_matched(model, wanted if isinstance(wanted, str) else wanted[0], modules,
                                          "target_modules")  # fmt: skip
    chosen = {name: targets.matches(name, feedforward_modules) for name in modules
              if targets.matches(name, target_modules)}  # fmt: skip
    stray = [name for name in modules if targets.matches(name, feedforward_modules) and name not in chosen]
    if stray:
        raise ValueError(
            f"feedforward_modules {feedforward_modules!r} matches {stray[0]!r}, which target_modules "
            f"{target_modules!r} does not: add it to target_modules, or pass feedforward_modules=() to scale "
            "no input."
        )
    # a regular expression as it is; each name as a one-name tuple (a str alone would be read as a regex)
    is_regex = isinstance(feedforward_modules, str)
    wanted_inputs = [feedforward_modules] if is_regex else [(name,) for name in feedforward_modules]
    scaled_inputs = [name for name, scales_input in chosen.items() if scales_input]
    if unmatched := [wanted for wanted in wanted_inputs if not any(targets.matches(n, wanted) for n in scaled_inputs)]:
        unmatched = unmatched[0] if is_regex else unmatched[0][0]
        raise ValueError(
            f"feedforward_modules {unmatched!r} matches none of the targets, so every target would scale its "
            f"output, the FFN's down projection too: name a target whose input is the FFN's inner activation "
            f"(the family's default: {family_default_feedforward(model)}), or pass feedforward_modules=() to scale "
            "no input."
        )
    for name in chosen:
        module = modules[name]
        if isinstance(module, AdapterLayer) and not isinstance(module, IA3Scaled):
            raise ValueError(f"{name} already carries {module.method}: apply one method per model.")
        if not isinstance(module, (*LINEAR, IA3Scaled)):
            raise TypeError(
                f"{name!r} is a {type(module).__name__}; (IA)³ scales nn.Linear or Conv1D layers: target the "
                "projections inside it."
            )
        if isinstance(module, IA3Scaled) and module.scale_input != chosen[name]:
            raise ValueError(f"{name} scales its {'input' if module.scale_input else 'output'} in the adapters "
                             "it has: a new adapter must scale the same side (keep feedforward_modules).")  # fmt: skip
    return chosen


def family_default_feedforward(model: nn.Module) -> str:
    """The family's default ``feedforward_modules`` as text, for an error message ("unknown" outside the families)."""
    try:
        return repr(family_of(model, needed_by="").ia3_feedforward)
    except ValueError:
        return "unknown for this model"


def apply(model: nn.Module, config: IA3Config, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze the model and wrap every target in :class:`IA3Scaled`, whose vector ``ia3_l[adapter]`` (ones)
    trains. Every check runs before the model changes. Works on the meta device (``peftlab.models.meta_model``)."""
    if not isinstance(config, IA3Config):
        raise TypeError(f"ia3.apply takes an IA3Config, got {type(config).__name__}.")
    layers.check_can_add(model, "ia3", adapter)
    chosen = resolve_targets(model, config)
    saved = targets.resolve_modules_to_save(model, config.modules_to_save)
    heads = targets.find_modules_to_save(model, saved)
    if clash := [name for name in chosen if targets.within(name, saved)]:
        raise ValueError(f"{clash[0]} is both an (IA)³ target and (in) one of the modules_to_save: choose one.")
    model.requires_grad_(False)
    for name, scale_input in chosen.items():
        module = model.get_submodule(name)
        layer = module if isinstance(module, IA3Scaled) else IA3Scaled(module, scale_input)
        layer.add(adapter)
        if layer is not module:
            model.set_submodule(name, layer)
    for head in heads.values():
        head.requires_grad_(True)
    layers.remember(model, "ia3", adapter, dataclasses.replace(config, modules_to_save=saved))
    layers.set_active(model, adapter)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every active l into its weights (see :meth:`IA3Scaled.merge`); :func:`unmerge` divides it out again."""
    return layers.merge_all(model, IA3Scaled)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """:func:`merge`, then every (IA)³ layer replaced by its base layer (:func:`peftlab.methods.layers.unload`):
    the base architecture with the scaled weights, at exactly the base model's cost. There is no way back."""
    return layers.merge_and_unload(model, IA3Scaled)


def unload(model: nn.Module) -> nn.Module:
    """Replace every merged (IA)³ layer by its base layer (:func:`peftlab.methods.layers.unload`); :func:`merge`
    first."""
    return layers.unload(model, IA3Scaled)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (exact up to rounding; l must have no zero, checked before anything changes)."""
    found = layers.merged_layers(model, IA3Scaled, merge=False)
    if any((layer.scaling(layer.merged) == 0).any() for layer in found.values() if layer.merged):
        raise ValueError("An (IA)³ vector has a zero entry: the weights it zeroed cannot be recovered by unmerging.")
    return layers.unmerge_all(model, IA3Scaled)
