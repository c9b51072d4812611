"""LoRA-drop: keep LoRA where its output matters, let every other layer share one LoRA (Zhou et al., 2024,
"LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation", arXiv:2402.07721).

LoRA adds ΔW_i x = γ B_i A_i x to the output of each adapted layer i. LoRA-drop judges a layer's LoRA by the size of
what it adds, on data:

1. **Sample.** Train plain LoRA (:func:`peftlab.methods.lora.apply`) for a short while on a sample of the data.
2. **Importance.** For each LoRA layer i, the mean squared norm of its output over the sample's tokens, normalised
   to sum to 1 over the layers (:func:`layer_importance`):

       g_i = mean_x ‖ΔW_i x‖²,      I_i = g_i / Σ_k g_k

3. **Select.** Sort the layers by I_i, largest first, and keep the fewest whose importances add up to at least the
   threshold T (e.g. 0.9) (:func:`kept_layers`).
4. **Share.** A fresh model gets LoRA again (:func:`apply`, with the importance in :class:`LoRADropConfig`):
   each kept layer has its own A and B; all the other layers share one A and one B (one ΔW = γ B A for all of
   them). Sharing needs equal shapes, so the dropped layers
   are grouped by (d_in, d_out) and each group shares one LoRA: in Llama, the dropped q_proj and o_proj (d → d) share
   one, k_proj and v_proj (d → d_kv) another. Then train the new model on the full data.

**Parameters.** Σ_kept r (d_in + d_out) + Σ_groups r (d_in + d_out): each shared pair counted once
(:func:`count_shared_parameters`; ``nn.Module.parameters()`` already yields a shared tensor once, so
:func:`peftlab.params.count_parameters` and the optimizer see each shared tensor once).

The squared norm includes LoRA's scaling γ = α / r (it is what the layer adds); with one ``LoRAConfig`` γ is the same
for every layer and the normalised importances are those of ‖B A x‖². Padding tokens (``attention_mask`` = 0) are
left out of the mean. peft has no LoRA-drop, so the tests check the definitions and the closed-form counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from peftlab.methods import layers, lora
from peftlab.methods.layers import DEFAULT_ADAPTER
from peftlab.methods.lora import LoRAConfig

UNIFORM = "uniform"


@dataclass(frozen=True)
class LoRADropConfig:
    """LoRA-drop's second stage: LoRA as ``lora`` says, the layers chosen by ``importance`` and ``threshold``.

    ``importance``: the layers' importances from :func:`layer_importance` (on a model with the same ``lora``
    config), or ``"uniform"`` (every layer equally important, for counting parameters without data: ``threshold``
    then keeps that share of the layers, in name order). ``threshold`` T: keep the most important layers until
    their importances add up to T (1: keep every layer with a non-zero importance; smaller: share more).
    """

    importance: Mapping[str, float] | str | None = None
    threshold: float = 0.9
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not 0 < self.threshold <= 1:
            raise ValueError(
                f"threshold must be in (0, 1] (a share of the total importance, e.g. 0.9), got {self.threshold!r}."
            )
        if not isinstance(self.lora, LoRAConfig):
            raise TypeError(f"LoRADropConfig.lora takes a LoRAConfig, got {type(self.lora).__name__}.")
        if self.importance is None:
            raise ValueError(
                "LoRA-drop needs the layers' importance: measure it with layer_importance(model, sample_loader) on a "
                "briefly trained LoRA model, or pass importance='uniform' to count parameters without data."
            )
        if isinstance(self.importance, str) and self.importance != UNIFORM:
            raise ValueError(f"importance must be a mapping of layer names to importances, or {UNIFORM!r}.")


# ----------------------------------------------------------------------------------------------------------------
# Importance: the size of each LoRA's output
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_importance(model: nn.Module, loader: Iterable[dict], max_batches: int | None = None) -> dict[str, float]:
    """I_i = g_i / Σ_k g_k with g_i = mean over tokens of ‖ΔW_i x‖², for every LoRA layer of ``model``.

    A forward hook on each :class:`~peftlab.methods.lora.LoRALinear` recomputes its LoRA branch, γ B A x, from the
    layer's input. The batches are those of training (``labels`` are ignored); ``max_batches`` limits how many are
    read (``None``: all). The model runs in eval mode, without gradients, and gets its mode back.
    """
    layers = lora.lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: lora.apply it and train it for a while first.")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 (or None for every batch), got {max_batches!r}.")
    device = next(model.parameters()).device
    squared_norm_sum = dict.fromkeys(layers, 0.0)
    tokens = dict.fromkeys(layers, 0)
    current = {}  # the attention mask of the batch being run, read by the hooks

    def measure(name: str):
        def hook(layer: lora.LoRALinear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            adapter = layer.active[0]
            update = layer.lora_B[adapter](layer.lora_A[adapter](x)) * layer.scaling[adapter]
            squared = update.float().pow(2).sum(dim=-1)  # one per token
            mask = current.get("attention_mask")
            if mask is not None and mask.shape == squared.shape:
                squared = squared * mask
                count = int(mask.sum())
            else:
                count = squared.numel()
            squared_norm_sum[name] += squared.sum().item()
            tokens[name] += count

        return hook

    handles = [layer.register_forward_hook(measure(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            batch = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            current["attention_mask"] = batch.get("attention_mask")
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not any(tokens.values()):
        raise ValueError("The loader gave no batches: layer_importance needs a sample of the data.")
    mean_squared_norm = {name: squared_norm_sum[name] / max(1, tokens[name]) for name in layers}
    total = sum(mean_squared_norm.values())
    if total == 0:
        raise ValueError(
            "Every LoRA output is zero (B is still at its zero init): train the LoRA model for a few steps on the "
            "sample before measuring importance."
        )
    return {name: value / total for name, value in mean_squared_norm.items()}


def kept_layers(importance: dict[str, float], threshold: float) -> list[str]:
    """The fewest layers, most important first, whose importances add up to at least ``threshold``."""
    LoRADropConfig(UNIFORM, threshold)  # the same check, the same message
    kept, cumulative = [], 0.0
    for name in sorted(importance, key=importance.get, reverse=True):
        if cumulative >= threshold - 1e-9:  # 1e-9: normalised importances may add up to 0.9999999999 for 1
            break
        kept.append(name)
        cumulative += importance[name]
    return kept


# ----------------------------------------------------------------------------------------------------------------
# The new model: own LoRA for the kept layers, one shared LoRA per shape for the others
# ----------------------------------------------------------------------------------------------------------------
def _importance(config: LoRADropConfig, layer_names) -> dict[str, float]:
    names = list(layer_names)
    return dict.fromkeys(names, 1 / len(names)) if config.importance == UNIFORM else dict(config.importance)


class Choice(NamedTuple):
    """Which LoRA layers keep their own A and B, and which share one pair, by (d_in, d_out)."""

    kept: list[str]
    shared: dict[tuple[int, int], list[str]]


def _choose(config: LoRADropConfig, found: dict[str, nn.Module]) -> Choice:
    kept = kept_layers(_importance(config, found), config.threshold)
    shared: dict[tuple[int, int], list[str]] = {}
    for name, module in found.items():
        if name not in kept:
            shared.setdefault(lora.targets.in_out(module), []).append(name)
    return Choice(kept=kept, shared=shared)


def choice(model: nn.Module) -> Choice:
    """The choice the model was made with (from its record: the importance and the threshold)."""
    applied = layers.record(model)
    if applied is None or applied.method != "lora-drop":
        raise ValueError("This model has no LoRA-drop: call lora_drop.apply(model, LoRADropConfig(...)) first.")
    return _choose(applied.config, lora.lora_layers(model))


def apply(model: nn.Module, config: LoRADropConfig, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Apply LoRA (``config.lora``) to a fresh ``model`` and make the layers that :func:`kept_layers` leaves out
    share their A and B, one pair per (d_in, d_out). The importance must name exactly this model's LoRA layers.

    The dropped layers literally hold the same ``lora_A[adapter]`` and ``lora_B[adapter]`` modules, so their
    Parameters are the same objects, updated once per step with the gradients of every layer that uses them
    (:func:`choice` says which layers kept their own).
    """
    if not isinstance(config, LoRADropConfig):
        raise TypeError(f"lora_drop.apply takes a LoRADropConfig, got {type(config).__name__}.")
    found, heads = lora.find_targets(model, config.lora, adapter, method="lora-drop")  # checked before any change
    importance = _importance(config, found)
    unknown, missing = sorted(set(importance) - set(found)), sorted(set(found) - set(importance))
    if unknown or missing:
        raise ValueError(
            f"importance must name exactly the LoRA layers of this model (target_modules="
            f"{config.lora.target_modules!r}): not in the model: {', '.join(unknown) or 'none'}; no importance for: "
            f"{', '.join(missing) or 'none'}. Measure it with layer_importance on a model with the same LoRAConfig."
        )
    chosen = _choose(config, found)
    model.requires_grad_(False)
    for name, module in found.items():
        layer = lora.LoRALinear(module, name=name)
        layer.add(adapter, config.lora)
        model.set_submodule(name, layer)
    wrapped = lora.lora_layers(model)
    for names in chosen.shared.values():
        owner = wrapped[names[0]]
        for name in names[1:]:
            wrapped[name].lora_A[adapter] = owner.lora_A[adapter]  # the same module, so the same Parameter
            wrapped[name].lora_B[adapter] = owner.lora_B[adapter]
    for head in heads.values():
        head.requires_grad_(True)
    layers.remember(model, "lora-drop", adapter, dataclasses.replace(config, lora=lora.resolved(model, config.lora)))
    layers.set_active(model, adapter)
    return model


class SharedCount(NamedTuple):
    """Trainable parameters counting each tensor once (``unique``) and once per layer that uses it (``per_layer``)."""

    unique: int
    per_layer: int


def count_shared_parameters(model: nn.Module) -> SharedCount:
    """Trainable parameters with shared tensors counted once, and as if every layer had its own copy.

    ``named_parameters(remove_duplicate=False)`` lists a shared tensor under every name that reaches it;
    ``parameters()`` (and so the optimizer and :func:`peftlab.params.count_parameters`) lists it once.
    """
    every_name = [p for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    unique = {id(p): p for p in every_name}
    return SharedCount(unique=sum(p.numel() for p in unique.values()), per_layer=sum(p.numel() for p in every_name))
