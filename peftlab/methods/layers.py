"""The layer contract: one shape for every module a method wraps, and what a model knows about its methods.

Every method that wraps a layer (LoRA and its variants, (IA)³, bottleneck adapters) does it with a subclass of
:class:`AdapterLayer`:

* the wrapped module is always ``base_layer`` (``weight`` and ``bias`` read through to it, as transformers'
  dtype checks expect);
* it holds one or more *named adapters* (``"default"`` unless told otherwise), of which a set is *active*;
  :func:`set_active` chooses them for the whole model, and only the active ones train;
* ``merge`` / ``unmerge`` fold the active adapters into the base weight where the method allows it;
* :meth:`~AdapterLayer.describe` tells the memory estimator what the layer saves for backward;
* ``enabled`` switches every adapter off at once: :func:`disabled` does it for a whole model, for a block of code,
  so that the same model computes the base model's outputs (DPO's reference model, every before/after comparison,
  without a second copy in memory).

Whole-model wrappers (soft prompts, prefixes) wrap the transformers model as ``base_model`` and keep the same switch
(:class:`ModelWrapper`). What was applied is one :class:`Applied` record on the model, ``model.peftlab``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DEFAULT_ADAPTER = "default"


@dataclass
class Applied:
    """What was applied to a model: the method, each named adapter's config, and the active adapters."""

    method: str
    configs: dict[str, Any] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)

    @property
    def config(self):
        """The config of the (single) active adapter."""
        if len(self.active) != 1:
            raise ValueError(f"{len(self.active)} adapters are active ({', '.join(self.active)}): name one.")
        return self.configs[self.active[0]]


def record(model: nn.Module) -> Applied | None:
    """The model's :class:`Applied` record, or ``None`` for a model no method touched."""
    return getattr(model, "peftlab", None)


def check_can_add(model: nn.Module, method: str, adapter: str) -> None:
    """Refuse, before anything changes, a second method on a model, or an adapter name that is taken."""
    check_adapter_name(adapter)
    applied = record(model)
    if applied is None:
        return
    if applied.method != method:
        raise ValueError(
            f"This model already carries {applied.method}; {method} on top of it is not supported: apply one method "
            "per model (load a fresh base model for another)."
        )
    if adapter in applied.configs:
        raise ValueError(
            f"The model already has an adapter named {adapter!r} ({method}): choose another name (adapter=...) to "
            "add one beside it, or load a fresh base model."
        )


def remember(model: nn.Module, method: str, adapter: str, config) -> Applied:
    """Add a named adapter to the model's record, and make it the active one (one method per model, a name once)."""
    check_can_add(model, method, adapter)
    applied = record(model)
    if applied is None:
        applied = Applied(method=method)
        object.__setattr__(model, "peftlab", applied)  # a plain attribute, not a submodule
    applied.configs[adapter] = config
    applied.active = [adapter]
    return applied


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"An adapter name must be a Python identifier such as 'default' or 'sentiment', got {name!r}.")
    return name


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus named adapters (see the module docstring). Subclasses say ``method``, add an
    adapter in :meth:`add`, list its parameters in :meth:`adapter_parameters`, and compute in ``forward``."""

    method = "a method"
    #: Whether the layer can hold several named adapters.
    named = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_names: list[str] = []
        self.active: list[str] = []
        self.merged: list[str] = []
        self.enabled = True

    # Code that reads ``layer.weight`` / ``layer.bias`` of a wrapped layer (dtype checks in transformers) sees the base.
    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    def _added(self, name: str) -> None:
        """Bookkeeping for a new adapter: it becomes the active one."""
        if name in self.adapter_names:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        if self.adapter_names and not self.named:
            raise ValueError(f"{self.method} holds one adapter per model; load a fresh base model for another.")
        self.adapter_names.append(name)
        self.active = [name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that train for adapter ``name`` (LoRA-FA: B only)."""
        raise NotImplementedError

    def set_active(self, names: list[str]) -> None:
        """Activate ``names`` (they train), deactivate the others (frozen, not applied)."""
        if self.merged:
            raise RuntimeError("Adapters are merged into this layer: unmerge before switching adapters.")
        self.active = [name for name in names if name in self.adapter_names]
        for name in self.adapter_names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(name in self.active)

    def applied(self) -> list[str]:
        """The adapters the forward pass adds: the active ones not merged, none when disabled."""
        return [name for name in self.active if name not in self.merged] if self.enabled else []

    def merge(self) -> None:
        raise NotImplementedError(f"{self.method} cannot be merged into the base weight.")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{self.method} cannot be merged into the base weight, so not unmerged either.")

    def describe(self) -> dict[str, Any]:
        """What the memory estimator needs to know of this layer's active adapters (see ``peftlab.memory``)."""
        raise NotImplementedError


def adapter_layers(model: nn.Module, cls: type[AdapterLayer] = AdapterLayer) -> dict[str, AdapterLayer]:
    """The model's method layers (of ``cls``) by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, cls)}


def _layers_of(model: nn.Module, cls: type[AdapterLayer]) -> dict[str, AdapterLayer]:
    """The ``cls`` layers, refused where the model has none."""
    found = adapter_layers(model, cls)
    if not found:
        raise ValueError(f"{type(model).__name__} has no {cls.method} layers: apply {cls.method} first.")
    return found


def merged_layers(model: nn.Module, cls: type[AdapterLayer], merge: bool) -> dict[str, AdapterLayer]:
    """The layers that :func:`merge_all` (``merge=True``) or :func:`unmerge_all` would change, checked: the model has
    such layers, and none is merged yet (or some are, to unmerge)."""
    found = _layers_of(model, cls)
    if merge and any(layer.merged for layer in found.values()):
        raise RuntimeError(f"The model's {cls.method} is already merged: merging twice would apply it twice. Unmerge "
                           "first.")  # fmt: skip
    if not merge and not any(layer.merged for layer in found.values()):
        raise RuntimeError(f"The model's {cls.method} is not merged: there is nothing to unmerge (merge first).")
    return found


def merge_all(model: nn.Module, cls: type[AdapterLayer]) -> nn.Module:
    """Fold every active adapter of the ``cls`` layers into its base weight (each layer's :meth:`merge`)."""
    for layer in merged_layers(model, cls, merge=True).values():
        layer.merge()
    return model


def unmerge_all(model: nn.Module, cls: type[AdapterLayer]) -> nn.Module:
    """Take every merged adapter of the ``cls`` layers back out of its base weight (each layer's :meth:`unmerge`)."""
    for layer in merged_layers(model, cls, merge=False).values():
        if layer.merged:
            layer.unmerge()
    return model


def unload(model: nn.Module, cls: type[AdapterLayer]) -> nn.Module:
    """Replace every ``cls`` layer by its base layer, once all its adapters are merged into it: the base
    architecture with the merged weights, no wrapper and no method record left, so that a forward pass is the base
    model's own (peft's ``merge_and_unload``). A merged layer still costs a wrapper's call per pass; an unloaded
    one nothing. There is no way back. Refused, before anything changes, where a layer holds an adapter that is not
    merged: unloading would drop it."""
    found = _layers_of(model, cls)
    _refuse_dropping_adapters(found, cls, merging=False)
    return _replace_by_base_layers(model, found)


def merge_and_unload(model: nn.Module, cls: type[AdapterLayer]) -> nn.Module:
    """:func:`merge_all`, then :func:`unload`, checked for both before either changes the model: an adapter that
    merging would leave out (not active) is refused before anything is merged."""
    found = merged_layers(model, cls, merge=True)
    _refuse_dropping_adapters(found, cls, merging=True)
    return _replace_by_base_layers(merge_all(model, cls), found)


def _refuse_dropping_adapters(found: dict[str, AdapterLayer], cls: type[AdapterLayer], merging: bool) -> None:
    """Unloading keeps only what is merged into the base weights (with ``merging``: also what merging adds, the
    active adapters); any other adapter would be lost."""
    for name, layer in found.items():
        kept = set(layer.merged) | (set(layer.active) if merging else set())
        if left := [adapter for adapter in layer.adapter_names if adapter not in kept]:
            raise RuntimeError(
                f"{name} holds {cls.method} adapter(s) {left} that are not merged, and unloading would drop them: "
                "merge first (make them the active ones), or load a fresh base model."
            )


def _replace_by_base_layers(model: nn.Module, found: dict[str, AdapterLayer]) -> nn.Module:
    for name, layer in found.items():
        model.set_submodule(name, layer.base_layer)
    if record(model) is not None and not adapter_layers(model):
        object.__delattr__(model, "peftlab")
    return model


class ModelWrapper(nn.Module):
    """A whole-model wrapper (soft prompts, prefixes): the transformers model is ``base_model``; ``enabled`` False
    runs it as it is."""

    def __init__(self, base_model: nn.Module):
        super().__init__()
        self.base_model = base_model
        self.config = base_model.config
        self.enabled = True


def _switches(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, AdapterLayer | ModelWrapper)]


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block of code with every adapter of ``model`` switched off: the model computes what its base computes.

    ``with disabled(model): reference_logits = model(**batch).logits``. Nothing is copied; the adapters come back
    on at the end of the block, also after an error. Merged adapters are in the weights and cannot be switched off:
    unmerge first. A head that trains in full beside the adapters (``modules_to_save``, ``train_head``) is the
    model's own module and stays as trained. A model whose method changed the weights themselves (full, Freeze,
    BitFit) has nothing to switch.
    """
    switches = _switches(model)
    if not switches:
        applied = record(model)
        if applied is not None:
            raise ValueError(
                f"{applied.method} trains the model's own weights, so there is no adapter to switch off: keep a copy "
                "of the base model to compare with."
            )
        raise ValueError(f"{type(model).__name__} has no adapters to switch off: apply a method first.")
    merged = [name for name, layer in adapter_layers(model).items() if layer.merged]
    if merged:
        raise RuntimeError(f"{merged[0]} (and {len(merged) - 1} more) are merged into the weights: unmerge first.")
    states = [switch.enabled for switch in switches]
    for switch in switches:
        switch.enabled = False
    try:
        yield model
    finally:
        for switch, state in zip(switches, states, strict=True):
            switch.enabled = state


def set_active(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` (one adapter, or several applied together) the active adapters of every layer: they compute
    and train, the others are frozen and skipped. Unknown names are refused with the ones the model has."""
    applied = record(model)
    if applied is None or not adapter_layers(model):
        raise ValueError(f"{type(model).__name__} has no named adapters: apply LoRA, (IA)³ or adapters first.")
    wanted = [names] if isinstance(names, str) else list(names)
    if not wanted:
        raise ValueError("Name at least one adapter to activate (use disabled(model) to switch them all off).")
    for name in wanted:
        if name not in applied.configs:
            close = difflib.get_close_matches(name, list(applied.configs), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"No adapter named {name!r}.{hint} The model has: {', '.join(applied.configs)}.")
    for layer in adapter_layers(model).values():
        layer.set_active(wanted)
    applied.active = wanted
    return model


def placement(base: nn.Module) -> dict[str, Any]:
    """Where a method's new tensors go: the base weight's device and dtype (also the meta device, for counting)."""
    weight = base.weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}
