"""Bytes of what a training step keeps for every parameter: weights, gradients, optimizer states and temporaries."""

from __future__ import annotations

import math

from torch import nn

from peftlab.memory.activations import _base_of
from peftlab.methods import targets
from peftlab.methods.layers import AdapterLayer
from peftlab.methods.qlora import Linear4bit

QUANTISED = ("int8", "nf4", "nf4-dq")
#: Which frozen linear layers a quantised base stores quantised (``Setup.quantised_layers``): every one of the
#: blocks (bitsandbytes' ``load_in_4bit`` / ``load_in_8bit``), or only the layers the method adapts (peftlab's
#: ``qlora.apply``, which quantises its LoRA targets and leaves the other layers 16-bit).
QUANTISED_LAYERS = ("blocks", "targets")
#: Bytes of optimizer state per trainable parameter, per byte of the parameter (8-bit Adam: 2 bytes whatever).
STATES_PER_PARAMETER = {"sgd": 0, "sgd-momentum": 1, "adamw": 2, "adagrad": 1, "rmsprop": 1}
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256


def quantised_bytes_per_parameter(precision: str) -> float:
    """Bytes per weight of a quantised base matrix: int8 1 (+ a fp32 scale per row, counted apart), NF4 ½ plus an
    fp32 absmax per block of 64 (0.5625), NF4 with double quantisation ½ plus an 8-bit absmax per block of 64 and
    an fp32 scale per 256 blocks (≈ 0.5159; Dettmers et al., 2023)."""
    if precision == "int8":
        return 1.0
    if precision == "nf4":
        return 0.5 + 4 / NF4_BLOCK
    return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DQ_BLOCK)


def quantisable_weights(model: nn.Module, layers: str = "blocks", head: bool = False) -> set[int]:
    """The weights a quantised base stores in int8 or NF4, by ``id``: the frozen linear layers of the blocks (the
    base layers of a method's layers among them), never embeddings, norms, heads or a method's own modules — as
    bitsandbytes and QLoRA do. ``layers="targets"``: only the base layers of a method's layers (peftlab's
    ``qlora.apply``). ``head=True``: the output head too (bitsandbytes with ``llm_int8_skip_modules=[]``), which
    must be frozen and not tied to the input embeddings (checked by the estimator)."""
    chosen = {}
    for name, module in targets.candidates(model).items():
        adapted = isinstance(module, AdapterLayer)
        if adapted:
            module = module.base_layer
        if not isinstance(module, targets.LINEAR) or any(part in targets.HEAD_NAMES for part in name.split(".")):
            continue
        if adapted or layers == "blocks":
            chosen[id(module.weight)] = module.weight
    output = _base_of(model)[0].get_output_embeddings() if head else None
    if output is not None and isinstance(output, targets.LINEAR):
        chosen[id(output.weight)] = output.weight
    return {key for key, weight in chosen.items() if not weight.requires_grad}


def weight_bytes(model: nn.Module, precision: str, layers: str = "blocks", head: bool = False) -> int:
    """Bytes of every parameter in its storage precision (see the module docstring). With a quantised base the
    frozen linear layers of the blocks are quantised (``layers`` and ``head``: :func:`quantisable_weights`);
    everything else is bf16. A model that already carries real 4-bit layers (``qlora.Linear4bit``, whose NF4
    codes and constants are buffers, not parameters) counts their bytes as they are."""
    dense = {"fp32": 4, "bf16-mixed": 4, "bf16": 2, "int8": 2, "nf4": 2, "nf4-dq": 2}[precision]
    quantised = quantisable_weights(model, layers, head) if precision in QUANTISED else set()
    total = float(sum(module.weight.nbytes for module in model.modules() if isinstance(module, Linear4bit)))
    for param in model.parameters():
        if id(param) in quantised:
            total += param.numel() * quantised_bytes_per_parameter(precision)
            if precision == "int8":
                total += 4 * param.shape[0]  # one fp32 scale per output row
        else:
            master_in_fp32 = param.requires_grad and precision in ("fp32", "bf16-mixed")
            total += param.numel() * (4 if master_in_fp32 else dense)
    return math.ceil(total)


def parameter_bytes(precision: str) -> int:
    """Bytes of a trainable parameter: fp32 master weights in fp32 and bf16-mixed; bf16 in pure bf16 and on a
    quantised base (QLoRA trains its adapters in the bf16 compute dtype)."""
    return 4 if precision in ("fp32", "bf16-mixed") else 2


def optimizer_state_bytes(trainable: int, optimizer: str, precision: str) -> int:
    """States per trainable parameter: AdamW m and v; momentum one; AdaGrad and RMSprop one running sum;
    8-bit Adam (Dettmers et al., 2022) two 1-byte states plus an fp32 absmax per block of 256 per state, as
    bitsandbytes allocates them (the paper's blocks were 2048): 2 + 8/256 bytes per parameter. bitsandbytes keeps
    32-bit states for tensors under ``min_8bit_size`` (4,096) elements, which this count, taking the total only,
    does not see (a bias or a norm's weight: a few kB)."""
    if optimizer == "adamw-8bit":
        return 2 * trainable + 2 * 4 * math.ceil(trainable / 256)
    return STATES_PER_PARAMETER[optimizer] * parameter_bytes(precision) * trainable


def optimizer_workspace_bytes(trainable: int, optimizer: str, precision: str) -> int:
    """Temporaries of the step. torch's multi-tensor (foreach) AdamW, AdaGrad and RMSprop compute a square root of
    their second-moment state as a new list of tensors (one copy of the trainable parameters); SGD, with or without
    momentum, updates in place; 8-bit Adam works in blocks (no full copy)."""
    copies = {"sgd": 0, "sgd-momentum": 0, "adamw": 1, "adamw-8bit": 0, "adagrad": 1, "rmsprop": 1}[optimizer]
    return copies * parameter_bytes(precision) * trainable
