"""Which modules a method touches: one target matcher for LoRA, QLoRA, AdaLoRA, (IA)³ and adapters.

``targets`` is given as peft gives it:

* a tuple of names: a module matches when its full name *is* the name or *ends with* ``"." + name``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``; ``"attention.self.query"`` matches BERT's queries);
* one string, a regular expression that must match the whole name (``re.fullmatch``);
* ``"all-linear"``: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output heads (``lm_head``, ``classifier``,
  ``score``).

Modules inside a method's layers (its ``base_layer``, its own matrices) are never targets: a method that meets its
own layer again adds a named adapter to it (see :mod:`peftlab.methods.layers`).
"""

from __future__ import annotations

import difflib
import re

from torch import nn
from transformers.pytorch_utils import Conv1D

ALL_LINEAR = "all-linear"
#: The new task head of a sequence classifier (BERT: ``classifier``; Llama & co.: ``score``), as peft names them.
TASK_HEADS = ("classifier", "score")
#: Output heads that ``"all-linear"`` leaves alone (as peft does): the LM head and the classification heads.
HEAD_NAMES = ("lm_head", *TASK_HEADS)
LINEAR = (nn.Linear, Conv1D)
Targets = str | tuple[str, ...]


def in_out(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer: ``nn.Linear`` (weight [out, in]), GPT-2's ``Conv1D``
    (weight stored [in, out]), or any layer that says so itself (a 4-bit layer, a method's layer)."""
    if isinstance(layer, Conv1D):
        rows, columns = layer.weight.shape
        return rows, columns
    return layer.in_features, layer.out_features


def normalise(targets, field: str = "target_modules") -> Targets:
    """A tuple of names, a regular expression, or ``"all-linear"``; a clear error for anything else."""
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as error:
                raise ValueError(
                    f"{field}={targets!r} is a string, so it is read as a regular expression, and it is not a valid "
                    f"one ({error}). For module names pass a tuple, e.g. ('q_proj', 'v_proj')."
                ) from error
        return targets
    names = tuple(targets)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(
            f"{field} must be module-name suffixes, e.g. ('q_proj', 'v_proj'), or one regex; got {targets!r}."
        )
    if ALL_LINEAR in names:
        if len(names) > 1:
            raise ValueError(f"{ALL_LINEAR!r} already targets every linear layer: pass it alone.")
        return ALL_LINEAR
    return names


def matches(name: str, targets: Targets) -> bool:
    """peft's rule (see the module docstring); ``"all-linear"`` is resolved by :func:`find`, not here."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def within(name: str, targets: Targets) -> bool:
    """Whether the module ``name``, or a module around it, matches (``classifier.dense`` is within ``classifier``)."""
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), targets) for i in range(1, len(parts) + 1))


def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module except the root and the insides of a method's layers."""
    from peftlab.methods.layers import AdapterLayer

    inside = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, AdapterLayer))
    return {name: module for name, module in model.named_modules() if name and not name.startswith(inside)}


def _is_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return module is output_head or any(part in HEAD_NAMES for part in name.split("."))


def nothing_matched(model: nn.Module, targets: Targets, modules: dict[str, nn.Module], field: str) -> ValueError:
    """The error for targets that match nothing: the close names, and the model's linear layers by last name."""
    linear = {name: module for name, module in modules.items() if isinstance(module, LINEAR)}
    by_kind: dict[str, list[str]] = {}
    for name, module in linear.items():
        kind = by_kind.setdefault(type(module).__name__, [])
        if (last := name.rsplit(".", 1)[-1]) not in kind:
            kind.append(last)
    available = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in by_kind.items()) or "none"
    wanted = [targets] if isinstance(targets, str) else list(targets)
    names = sorted({name.rsplit(".", 1)[-1] for name in linear} | set(linear))
    close = {match for target in wanted for match in difflib.get_close_matches(target, names, n=3, cutoff=0.5)}
    hint = f" Close names: {', '.join(sorted(close))}." if close else ""
    return ValueError(
        f"No module of {type(model).__name__} matched {field}={targets!r}.{hint} "
        f"Its linear layers, by last name: {available}."
    )


def find(model: nn.Module, targets: Targets, method: str, field: str = "target_modules",
         layer_class: type | None = None) -> dict[str, nn.Module]:  # fmt: skip
    """The modules ``targets`` names, by full name: linear layers, or ``layer_class`` layers (the method's own, to
    which a named adapter is added). Every error is raised here, before anything changes: nothing matched (with
    close names), a match that is not a linear layer (with the linear layers inside it), another method's layer."""
    from peftlab.methods.layers import AdapterLayer

    targets = normalise(targets, field)
    modules = candidates(model)
    accepted = LINEAR + ((layer_class,) if layer_class else ())
    if targets == ALL_LINEAR:
        found = {n: m for n, m in modules.items() if isinstance(m, accepted) and not _is_head(model, n, m)}
    else:
        found = {name: module for name, module in modules.items() if matches(name, targets)}
    if not found:
        raise nothing_matched(model, targets, modules, field)
    for name, module in found.items():
        if isinstance(module, AdapterLayer) and not isinstance(module, accepted):
            raise ValueError(
                f"{name} already carries {module.method}, and {method} would wrap it again: apply one method per "
                "model (load a fresh base model for another)."
            )
        if not isinstance(module, accepted):
            inside = {n: m for n, m in modules.items() if n.startswith(f"{name}.")}
            inner = [n.rsplit(".", 1)[-1] for n, m in inside.items() if isinstance(m, LINEAR)]
            raise ValueError(
                f"{field}={targets!r} matches {name}, a {type(module).__name__}, but {method} wraps linear layers "
                f"(nn.Linear, Conv1D) only. Target the linear layers inside it instead, e.g. "
                f"{', '.join(dict.fromkeys(inner[:4])) or 'q_proj, v_proj'}."
            )
    return found


def find_modules_to_save(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """The modules that train in full beside the method (a new classification head, say); a clear error for a name
    that matches nothing, with close names."""
    modules = candidates(model)
    found = {name: module for name, module in modules.items() if matches(name, names)}
    for wanted in names:
        if not any(matches(name, (wanted,)) for name in found):
            close = difflib.get_close_matches(wanted, [n.rsplit(".", 1)[-1] for n in modules], n=3, cutoff=0.5)
            hint = f" Close names: {', '.join(sorted(set(close)))}." if close else ""
            raise ValueError(f"modules_to_save: no module of {type(model).__name__} is named {wanted!r}.{hint}")
    return found


def task_head(model: nn.Module) -> str | None:
    """The name of a sequence classifier's new task head (a child named ``classifier`` or ``score``), else None."""
    return next((name for name, _ in model.named_children() if name in TASK_HEADS), None)


def resolve_modules_to_save(model: nn.Module, names: tuple[str, ...] | None) -> tuple[str, ...]:
    """``names``, or (``None``) the one decision every method makes by default: a classifier's new, randomly
    initialised head trains in full (as peft's ``SEQ_CLS`` does), a model without one trains no module in full."""
    if names is not None:
        return names
    head = task_head(model)
    return (head,) if head else ()


def check_names(names, field: str = "modules_to_save") -> tuple[str, ...]:
    """A tuple of non-empty module names (a lone string is refused: it would be read letter by letter)."""
    if isinstance(names, str) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{field} must be a tuple of module names, e.g. ('classifier',); got {names!r}.")
    return tuple(names)
