"""QLoRA: LoRA on a frozen 4-bit base (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv:2305.14314).

Every linear layer that LoRA targets keeps its weight W only in NF4 (:mod:`peftlab.quant`, about 0.516 bytes per
parameter with double quantisation instead of 2 in bf16 or 4 in fp32). The forward pass dequantises it on the fly,
in the compute dtype, and adds the LoRA update, which stays in full precision:

    h = dequant(W_NF4) x + γ · B A x,        γ = α / r

Gradients flow through dequant(W_NF4) to the input x (so that the layers below get theirs) but W_NF4 never changes:
only A and B train. QLoRA adapts every linear layer of the blocks (``target_modules="all-linear"``), which recovers
the quality of 16-bit full fine-tuning; the embeddings and the LM head stay as they are (not quantised, frozen).

A trained adapter is an ordinary LoRA adapter (:func:`peftlab.methods.lora.save`). It is not merged into the 4-bit
weight (W + ΔW is not an NF4 tensor): load it into the full-precision model and merge there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.methods import layers, lora
from peftlab.methods.layers import DEFAULT_ADAPTER
from peftlab.methods.lora import LoRAConfig, LoRALinear
from peftlab.methods.targets import ALL_LINEAR
from peftlab.quant import NF4Tensor, bitsandbytes_state, dequantize_nf4, dequantize_nf4_kernel, quantize_nf4

KERNELS = ("auto", "peftlab", "bitsandbytes")

#: QLoRA's LoRA: every linear layer of the blocks (as in Dettmers et al., 2023), with LoRAConfig's r = 8, α = 16.
DEFAULT_LORA = LoRAConfig(target_modules=ALL_LINEAR)


@dataclass(frozen=True)
class QLoRAConfig:
    """LoRA's settings (``lora``) plus how the targeted layers are quantised: NF4 in blocks of ``block_size`` values,
    double quantisation of the block constants, and the dtype the forward pass computes in (bf16 in the paper on a
    GPU; fp32 here by default, as on a CPU). ``kernel`` chooses who dequantises in training: peftlab's NF4 from
    scratch, or bitsandbytes' fused kernel over the very same tensors ("auto": the kernel on CUDA; bitsandbytes'
    CPU kernel misreads rows shorter than a block, seen with 32-wide layers)."""

    lora: LoRAConfig = DEFAULT_LORA
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32
    kernel: str = "auto"  # dequantise from scratch ("peftlab"), by bitsandbytes' kernel, or "auto": it on CUDA

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"Unknown kernel {self.kernel!r}; use one of {', '.join(KERNELS)}.")
        if self.kernel == "bitsandbytes" and not _has_bitsandbytes():
            raise ValueError("kernel='bitsandbytes' needs the bitsandbytes package: pip install bitsandbytes, or use "
                             "kernel='peftlab' (the from-scratch dequantisation).")  # fmt: skip
        if not isinstance(self.lora, LoRAConfig):
            raise TypeError(f"QLoRAConfig.lora takes a LoRAConfig, got {type(self.lora).__name__}.")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"block_size must be a whole number of at least 2, e.g. 64; got {self.block_size!r}.")
        if self.block_size % 2:
            raise ValueError(f"block_size must be even (two 4-bit codes share a byte), e.g. 64; got {self.block_size}.")
        if not isinstance(self.compute_dtype, torch.dtype) or not self.compute_dtype.is_floating_point:
            raise ValueError(
                f"compute_dtype must be a floating dtype, e.g. torch.float32 or torch.bfloat16; "
                f"got {self.compute_dtype!r}."
            )


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


class _MatmulDequantized(torch.autograd.Function):
    """``x Wᵀ`` with W dequantised from NF4 in the forward pass and again in the backward pass.

    Plain ``F.linear(x, dequantize_nf4(W))`` would save the dequantised W for the backward pass: a full 16-bit copy
    of every quantised layer alive until backward, which undoes QLoRA's saving. Like bitsandbytes' ``MatMul4Bit``,
    this keeps only the 4-bit weight and dequantises it a second time when the gradient ∂L/∂x = δ W is needed (W is
    frozen, so ∂L/∂W is never needed).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized().to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output @ ctx.layer.dequantized().to(grad_output.dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: ``F.linear(x, dequantize_nf4(weight), bias)``.

    The NF4 tensors are buffers (they move with ``.to(device)`` and are in the state dict, and they have no
    gradient); the full-precision weight is not kept. The bias, if any, is a frozen parameter in the compute dtype.
    :func:`peftlab.params.weights` counts the NF4 weight as ``out_features × in_features`` frozen parameters.
    """

    stores_weight_as_buffers = True

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.shape, self.dtype, self.block_size = weight.shape, weight.dtype, weight.block_size
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("absmax_scales", weight.absmax_scales)  # None without double quantisation
        self.register_buffer("absmax_mean", weight.absmax_mean)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.kernel = "peftlab"  # how dequantized() computes; QLoRAConfig.kernel sets it
        self._state = None  # bitsandbytes' view of the same tensors, when its kernel dequantises

    @classmethod
    def from_linear(
        cls, layer: nn.Module, block_size: int = 64, double_quant: bool = True, compute_dtype=torch.float32
    ) -> Linear4bit:
        """Quantise an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose [in, out] weight is transposed to [out, in])."""
        weight = layer.weight.T if isinstance(layer, Conv1D) else layer.weight
        return cls(quantize_nf4(weight.detach(), block_size, double_quant), layer.bias, compute_dtype)

    @property
    def weight(self) -> NF4Tensor:
        """The NF4 weight, rebuilt from the buffers (no copy)."""
        return NF4Tensor(self.packed, self.absmax, self.shape, self.dtype, self.block_size,
                         self.absmax_scales, self.absmax_mean)  # fmt: skip

    def dequantized(self) -> torch.Tensor:
        """W in full precision, for one matmul: from scratch (:func:`peftlab.quant.dequantize_nf4`), or by
        bitsandbytes' fused kernel where ``kernel`` says so (``"auto"``: on CUDA when bitsandbytes is installed).
        The kernel reads the same tensors through bitsandbytes' QuantState, built once per device."""
        if not self._uses_kernel():
            return dequantize_nf4(self.weight)
        if self._state is None or self._state[0].data_ptr() != self.packed.data_ptr():  # new, or moved
            self._state = bitsandbytes_state(self.weight)
        return dequantize_nf4_kernel(self.weight, self._state)

    def _uses_kernel(self) -> bool:
        if self.kernel == "bitsandbytes":
            return True
        return self.kernel == "auto" and self.packed.device.type == "cuda" and _has_bitsandbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MatmulDequantized.apply(x.to(self.compute_dtype), self)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        double = ", double_quant" if self.absmax_scales is not None else ""
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, NF4 block_size={self.block_size}{double}"


class QLoRALinear(LoRALinear):
    """:class:`~peftlab.methods.lora.LoRALinear` around a :class:`Linear4bit`: ``base(x) + B(A(dropout(x))) · γ``.

    Made from the full-precision layer (its shape, device and dtype, so that A and B are made as LoRA makes them,
    with the same random A for the same seed); then the base is replaced by its 4-bit copy and the full-precision
    weight dropped. ``fan_in_fan_out`` still tells the layout of the original layer (True for GPT-2's Conv1D), as a
    saved adapter needs; the 4-bit weight itself is always [out, in].
    """

    method = "QLoRA"

    def __init__(self, layer: nn.Module, config: QLoRAConfig, name: str = "layer"):
        super().__init__(layer, name=name)
        self.base_layer = Linear4bit.from_linear(layer, config.block_size, config.double_quant, config.compute_dtype)
        self.base_layer.kernel = config.kernel

    def merge(self) -> None:
        raise RuntimeError(
            "QLoRA's base weight is stored in 4 bits, and W + ΔW is not an NF4 tensor: merging here would quantise "
            "ΔW away. Save the adapter (lora.save), load it into the full-precision model (lora.load), merge there."
        )

    def unmerge(self) -> None:
        raise RuntimeError("QLoRA layers are never merged: there is nothing to unmerge.")


def apply(model: nn.Module, config: QLoRAConfig, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze every parameter and replace each LoRA target (``config.lora.target_modules``) by a
    :class:`QLoRALinear`: its weight in NF4, A and B trainable (B only with ``freeze_A``). The ``modules_to_save``
    train in full. Every check runs before the model changes. The model's record holds ``config.lora``, so that
    :func:`peftlab.methods.lora.save` writes the adapter in peft's format.
    """
    if not isinstance(config, QLoRAConfig):
        raise TypeError(f"qlora.apply takes a QLoRAConfig, got {type(config).__name__}.")
    found, heads = lora.find_targets(model, config.lora, adapter, method="qlora")
    _check_targets({n: m for n, m in found.items() if not isinstance(m, QLoRALinear)}, config.block_size)
    model.requires_grad_(False)
    for name, module in found.items():
        layer = module if isinstance(module, QLoRALinear) else QLoRALinear(module, config, name=name)
        layer.add(adapter, config.lora)
        if layer is not module:
            model.set_submodule(name, layer)
    for head in heads.values():
        head.requires_grad_(True)
    layers.remember(model, "qlora", adapter, dataclasses.replace(config, lora=lora.resolved(model, config.lora)))
    layers.set_active(model, adapter)
    return model


def _check_targets(targets: dict[str, nn.Module], block_size: int) -> None:
    """Each target's weight must be real (not on the meta device) and split into whole blocks."""
    for name, layer in targets.items():
        if layer.weight.is_meta:
            raise ValueError(
                f"{name} is on the meta device: QLoRA quantises real weights. Load the model's weights first "
                "(count parameters with lora.apply, which works on the meta device)."
            )
    for name, layer in targets.items():
        numel, shape = layer.weight.numel(), " × ".join(map(str, layer.weight.shape))
        if numel % block_size:
            common = math.gcd(*(t.weight.numel() for t in targets.values()))
            fits = min(common & -common, 64)  # the largest power of two ≤ 64 that divides every target
            raise ValueError(
                f"block_size={block_size} does not divide the weight of {name} ({shape} = {numel} values). "
                f"Choose a block_size that divides every target's weight ({fits} does here), "
                "or leave this layer out of target_modules."
            )


def quantized_layers(model: nn.Module) -> dict[str, Linear4bit]:
    """The model's 4-bit layers by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Linear4bit)}


def weight_bytes(model: nn.Module) -> int:
    """The real bytes of the 4-bit weights: packed codes, block constants and, with double quantisation, their
    scales and means (biases left out). Compare with 4 bytes per parameter in fp32, 2 in bf16."""
    return sum(layer.weight.nbytes for layer in quantized_layers(model).values())
