"""Parameter reports: how many parameters train and how many are frozen, by module kind and by layer.

Every parameter gets a *kind* from the module that holds it and its name — ``embedding``, ``attention``, ``ffn``,
``norm``, ``head`` (classifier, LM head, pooler), or the method that added it (``lora``, ``adapter``, ``prompt``,
``prefix``, ``ia3``) — and a *layer*: the index of the transformer block, or ``None`` outside the blocks.
Works on real models and on models built on the meta device (no memory needed).

A quantised weight counts as one frozen parameter per value of the original matrix, whatever holds it: peftlab's
:class:`~peftlab.methods.qlora.Linear4bit` keeps its NF4 codes as buffers (``named_parameters`` does not list them),
and bitsandbytes' ``Params4bit`` is a parameter of ``numel / 2`` packed bytes. Counting what ``parameters()`` lists
would drop the 4-bit weights from the total and inflate the trainable share (peft's ``print_trainable_parameters``
makes the same correction for bitsandbytes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
from torch import nn

#: Name fragments of parameters that a PEFT method adds, checked first (the method owns them).
METHOD_KINDS = {"lora": ("lora_",), "adapter": ("adapter",), "prompt": ("prompt_encoder", "soft_prompt"),
                "prefix": ("prefix",), "ia3": ("ia3_",)}  # fmt: skip
EMBEDDING_NAMES = ("embed", "wte", "wpe")
ATTENTION_NAMES = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")
FFN_NAMES = ("mlp", "intermediate", "output.dense", "gate_proj", "up_proj", "down_proj", "c_fc")
HEAD_NAMES = ("classifier", "lm_head", "pooler", "score", "cls.")
KINDS = ("embedding", "attention", "ffn", "norm", "head", *METHOD_KINDS, "other")

_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to (``...layers.3.mlp...`` → 3), else ``None``."""
    match = _LAYER_INDEX.search(f".{name}")
    return int(match.group(1)) if match else None


def kind_of(name: str, module: nn.Module) -> str:
    """The kind of a parameter, from its full name and the module that holds it (see the module docstring)."""
    lowered = name.lower()
    for kind, fragments in METHOD_KINDS.items():
        if any(fragment in lowered for fragment in fragments):
            return kind
    if "norm" in type(module).__name__.lower() or "layernorm" in lowered or re.search(r"(^|\.)ln_", lowered):
        return "norm"
    if isinstance(module, nn.Embedding) or any(fragment in lowered for fragment in EMBEDDING_NAMES):
        return "embedding"
    if any(fragment in lowered for fragment in HEAD_NAMES):
        return "head"
    if any(fragment in lowered for fragment in ATTENTION_NAMES):
        return "attention"
    if any(fragment in lowered for fragment in FFN_NAMES):
        return "ffn"
    return "other"


def weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[int, ...], bool]]:
    """Every weight of the model as ``(name, owning module, shape, trainable)``: the parameters (a shared tensor
    once, as ``named_parameters`` lists it), with a quantised weight in the shape of the matrix it stands for, and
    the weights peftlab's ``Linear4bit`` stores as buffers, frozen (see the module docstring)."""
    owner = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owner[f"{module_name}.{param_name}" if module_name else param_name] = module
    for name, param in model.named_parameters():
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes' Params4bit: packed bytes
        shape = tuple(quant_state.shape) if quant_state is not None else tuple(param.shape)
        yield name, owner.get(name, model), shape, param.requires_grad
    for module_name, module in model.named_modules():
        if getattr(module, "stores_weight_as_buffers", False):
            yield f"{module_name}.weight" if module_name else "weight", module, tuple(module.weight.shape), False


def parameter_table(model: nn.Module) -> pd.DataFrame:
    """One row per weight tensor (see :func:`weights`): name, kind, layer, shape, number of elements, trainable,
    is it a bias."""
    rows = [
        {
            "name": name,
            "kind": kind_of(name, module),
            "layer": layer_of(name),
            "shape": shape,
            "numel": math.prod(shape),
            "trainable": trainable,
            "bias": name.endswith("bias"),
        }
        for name, module, shape, trainable in weights(model)
    ]
    table = pd.DataFrame(rows, columns=["name", "kind", "layer", "shape", "numel", "trainable", "bias"])
    table["layer"] = table["layer"].astype("Int64")
    return table


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} ({self.percent:.4g} %)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters (shared tensors once, quantised weights as the values they stand for)."""
    listed = [(math.prod(shape), trainable) for _, _, shape, trainable in weights(model)]
    return ParameterCount(trainable=sum(n for n, trainable in listed if trainable), total=sum(n for n, _ in listed))


def _summarise(table: pd.DataFrame, by: str) -> pd.DataFrame:
    total = table["numel"].sum()
    grouped = (
        table.assign(
            trainable_numel=table["numel"].where(table["trainable"], 0),
            frozen_numel=table["numel"].where(~table["trainable"], 0),
        )
        .groupby(by, dropna=False, sort=False)[["trainable_numel", "frozen_numel", "numel"]]
        .sum()
    )
    grouped.columns = ["trainable", "frozen", "total"]
    grouped["% of model"] = 100.0 * grouped["total"] / total
    grouped["% trainable"] = 100.0 * grouped["trainable"] / grouped["total"]
    return grouped


def summary_by_kind(model: nn.Module) -> pd.DataFrame:
    """Trainable / frozen / total parameters per kind, with each kind's share of the model, in ``KINDS`` order."""
    summary = _summarise(parameter_table(model), "kind")
    return summary.reindex([kind for kind in KINDS if kind in summary.index])


def summary_by_layer(model: nn.Module) -> pd.DataFrame:
    """Trainable / frozen / total parameters per transformer block (``<NA>``: outside the blocks)."""
    return _summarise(parameter_table(model), "layer").sort_index()


def plot_by_kind(model: nn.Module, ax=None, title: str | None = None):
    """A horizontal bar per kind: all its parameters in grey, the trainable ones over it in colour (log scale)."""
    import matplotlib.pyplot as plt

    summary = summary_by_kind(model)
    ax = ax or plt.subplots(figsize=(6, 0.4 * len(summary) + 1))[1]
    ax.barh(summary.index, summary["total"], color="0.8", label="all")
    ax.barh(summary.index, summary["trainable"], color="C0", height=0.5, label="trainable")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set(xlabel="parameters (log scale)", title=title or str(count_parameters(model)))
    ax.legend(loc="lower right")
    return ax
