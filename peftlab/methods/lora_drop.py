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
4. **Share.** A fresh model gets LoRA again (:func:`apply`): each kept layer has its own A and B; all the other
   layers share one A and one B (one ΔW = γ B A for all of them). Sharing needs equal shapes, so the dropped layers
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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from peftlab import train
from peftlab.methods import lora
from peftlab.methods.lora import LoRAConfig


@dataclass(frozen=True)
class LoRADropConfig:
    """``threshold`` T: keep the most important layers until their importances add up to T (1: keep every layer
    with a non-zero importance; smaller: share more)."""

    threshold: float = 0.9

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not 0 < self.threshold <= 1:
            raise ValueError(
                f"threshold must be in (0, 1] (a share of the total importance, e.g. 0.9), got {self.threshold!r}."
            )


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
            squared = (layer.lora_B(layer.lora_A(x)) * layer.scaling).float().pow(2).sum(dim=-1)  # one per token
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
            batch = train.to_device({key: value for key, value in batch.items() if key != "labels"}, device)
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
    LoRADropConfig(threshold)  # the same check, the same message
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
def apply(model: nn.Module, importance: dict[str, float], lora_config: LoRAConfig, drop_config: LoRADropConfig):
    """Apply LoRA (``lora_config``) to a fresh ``model`` and make the layers that :func:`kept_layers` leaves out
    share their A and B, one pair per (d_in, d_out). ``importance`` comes from :func:`layer_importance` on a model
    with the same ``lora_config``: its names must be exactly this model's LoRA layers.

    The dropped layers literally hold the same ``lora_A`` and ``lora_B`` modules, so their Parameters are the same
    objects, updated once per step with the gradients of every layer that uses them. The choice is kept as
    ``model.lora_drop = {"kept": [...], "shared": {(d_in, d_out): [...]}}``.
    """
    if not isinstance(drop_config, LoRADropConfig):
        raise TypeError(f"lora_drop.apply takes a LoRADropConfig, got {type(drop_config).__name__}.")
    targets = lora._targets(model, lora_config)  # the layers lora.apply will wrap (checked before any change)
    unknown, missing = sorted(set(importance) - set(targets)), sorted(set(targets) - set(importance))
    if unknown or missing:
        raise ValueError(
            f"importance must name exactly the LoRA layers of this model (lora_config={lora_config.target_modules!r}):"
            f" not in the model: {', '.join(unknown) or 'none'}; no importance for: {', '.join(missing) or 'none'}. "
            "Measure it with layer_importance on a model with the same LoRAConfig."
        )
    lora.apply(model, lora_config)
    layers = lora.lora_layers(model)
    kept = kept_layers(importance, drop_config.threshold)
    shared: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers.items():
        if name not in kept:
            shared.setdefault((layer.in_features, layer.out_features), []).append(name)
    for names in shared.values():
        owner = layers[names[0]]
        for name in names[1:]:
            layers[name].lora_A = owner.lora_A  # the same module, so the same Parameter
            layers[name].lora_B = owner.lora_B
    model.lora_drop = {"kept": kept, "shared": shared}
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
