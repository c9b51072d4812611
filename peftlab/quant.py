"""4-bit NormalFloat (NF4) quantisation with double quantisation, from scratch (Dettmers et al., 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs", arXiv:2305.14314).

**Blockwise absmax quantisation.** Flatten the weight row-major and cut it into blocks of B consecutive values
(B = 64). Each block x gets one fp32 constant c = max |x_i|, and each value is stored as the index of the level q_k
of a 16-level code nearest to x_i / c (4 bits):

    code_i = argmin_k |x_i / c − q_k|,        x̂_i = q_{code_i} · c

One outlier only spoils its own block, not the whole tensor.

**NF4** (:func:`nf4_levels`) puts the 16 levels at quantiles of N(0, 1), rescaled to [−1, 1]: pretrained weights
are roughly normal, so each level is used about equally often. It is asymmetric (8 positive levels, 7 negative and an
exact 0), so that 0 is represented exactly and 16 levels are still used.

**Double quantisation** (DQ) quantises the constants c too: subtract their mean, then blockwise absmax with
blocks of 256 and an 8-bit code (bitsandbytes' dynamic code, :func:`dynamic_levels`). Memory per parameter
(:func:`bytes_per_parameter`):

    without DQ:  4 bits + 32 / B bits             = 0.5 + 4 / 64 B            = 0.5625 B
    with DQ:     4 bits + 8 / B + 32 / (256 · B)  = 0.5 + 1 / 64 + 4 / 16384 B ≈ 0.5159 B

The constants cost 32 / 64 = 0.5 bits per parameter without DQ and 8 / 64 + 32 / 16384 ≈ 0.127 bits with it: DQ
saves 0.373 bits per parameter (the paper's numbers; about 3 GB on a 65B model).

The layout is bitsandbytes' (``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")``): the same
levels, the same rounding (values halfway between two levels go to the lower one), the same absmax, and the same
packing, two codes per byte, the first value in the high nibble: ``byte = code[2i] << 4 | code[2i+1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The outermost quantile of NF4 (bitsandbytes' ``create_normal_map(offset=0.9677083)``): Φ⁻¹(δ) ≈ 1.848 σ is ±1.
NF4_OFFSET = 0.9677083
#: Double quantisation: the constants are quantised in blocks of 256 with an 8-bit code (as in QLoRA).
ABSMAX_BLOCK_SIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# The codes
# ----------------------------------------------------------------------------------------------------------------
def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, sorted, in [−1, 1] (QLoRA, Section 3, "4-bit NormalFloat Quantization").

    With Φ⁻¹ the inverse CDF of N(0, 1) and δ = 0.9677083:

        positive half: Φ⁻¹(p) for the 8 first points p of linspace(δ, 0.5, 9)   (the last, p = 0.5, gives 0)
        negative half: −Φ⁻¹(p) for the 7 first points p of linspace(δ, 0.5, 8)
        plus an exact 0; all divided by the largest, Φ⁻¹(δ), so that the range is [−1, 1].
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1])
    negative = -normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1])
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return levels / levels.max()


def dynamic_levels() -> torch.Tensor:
    """The 256 levels of bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map()``; Dettmers, 2016, "8-Bit
    Approximations for Parallelism in Deep Learning", arXiv:1511.04561), which QLoRA uses for the constants.

    A float-like code: for each decade i = 0 … 6 there are 2^i levels in 10^(i−6) · [0.1, 1] (the midpoints of
    2^i equal steps), with both signs, plus 0 and 1: 2 · 127 + 2 = 256 levels, fine near 0 and coarse near ±1.
    """
    levels = [torch.zeros(1), torch.ones(1)]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        midpoints = (edges[:-1] + edges[1:]) / 2
        levels += [10 ** (i - 6) * midpoints, -(10 ** (i - 6)) * midpoints]
    return torch.cat(levels).sort().values


# ----------------------------------------------------------------------------------------------------------------
# Blockwise absmax quantisation with any code
# ----------------------------------------------------------------------------------------------------------------
def blockwise_quantize(
    values: torch.Tensor, levels: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``block_size`` consecutive values (row-major), each scaled by 1 / absmax and rounded to the nearest
    of the sorted ``levels``. Returns (codes: uint8, one per value, flat; absmax: fp32, one per block).

    The nearest level is found by comparing with the midpoints between neighbouring levels (a value exactly on a
    midpoint goes to the lower level, as in bitsandbytes). An all-zero block has absmax 0 and codes of the level 0.
    """
    blocks = values.detach().reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    scale = 1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)  # no division by 0 for an all-zero block
    scaled = (blocks * scale[:, None]).clamp(-1, 1)
    midpoints = (levels[:-1] + levels[1:]) / 2
    codes = torch.bucketize(scaled, midpoints.to(scaled.device))
    return codes.to(torch.uint8).reshape(-1), absmax


def blockwise_dequantize(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """x̂ = level[code] · absmax of its block (fp32, flat). The block size is ``codes.numel() / absmax.numel()``."""
    values = levels.to(codes.device)[codes.long()].reshape(absmax.numel(), -1)
    return (values * absmax[:, None]).reshape(-1)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order): ``code[2i] << 4 | code[2i+1]``.
    Codes must be integers 0..15 in an even number (anything else would pack into another code silently)."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_4bit packs integer codes 0..15, got a {codes.dtype} tensor.")
    if codes.numel() % 2:
        raise ValueError(f"pack_4bit packs codes in pairs, got {codes.numel()} (an odd number): pad with a zero.")
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(
            f"pack_4bit packs 4-bit codes 0..15, got values from {codes.min().item()} to {codes.max().item()}: "
            "a code above 15 would overwrite its neighbour's nibble."
        )
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_4bit`: ``[byte >> 4, byte & 15]`` for each byte, in order."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# NF4 tensors
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class NF4Tensor:
    """A weight in NF4: everything needed to rebuild it, and nothing more (the full-precision values are gone).

    ``absmax`` holds the fp32 constants, one per block; with double quantisation it holds instead their 8-bit codes,
    and ``absmax_scales`` (fp32, one per 256 constants) and ``absmax_mean`` (fp32, one number) rebuild them:
    c = dynamic_level[code] · scale + mean.
    """

    packed: torch.Tensor  # uint8 [numel / 2]: two 4-bit codes per byte
    absmax: torch.Tensor  # fp32 [numel / block_size]; uint8 codes of (absmax − mean) with double quantisation
    shape: torch.Size  # of the original tensor
    dtype: torch.dtype  # of the original tensor: dequantize_nf4 returns this dtype
    block_size: int = 64
    absmax_scales: torch.Tensor | None = None  # double quantisation only
    absmax_mean: torch.Tensor | None = None  # double quantisation only

    @property
    def double_quant(self) -> bool:
        return self.absmax_scales is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """The real storage: the packed codes, the constants and, with double quantisation, their scales and mean."""
        tensors = [self.packed, self.absmax, self.absmax_scales, self.absmax_mean]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_quantisable(w: torch.Tensor, block_size: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        kind = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(
            f"NF4 quantises floating-point tensors (float32, float16, bfloat16), got {kind}. "
            "Pass the weight itself, converted with .float() if needed."
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(
            f"block_size must be an even whole number (two 4-bit codes share a byte), e.g. 64; got {block_size!r}."
        )
    if w.numel() and not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(
            f"The tensor holds {bad} NaN or infinite value(s): one of them would make its whole block of {block_size} "
            "NaN after quantisation. Find where they came from (a diverged run?) before quantising."
        )
    if w.numel() % block_size:
        numel = w.numel()
        raise ValueError(
            f"block_size={block_size} does not divide the {numel} values of the tensor (shape {tuple(w.shape)}): "
            f"choose a block size that divides {numel} (the largest power of two that does is {numel & -numel})."
        )


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantise ``w`` to NF4 in blocks of ``block_size`` consecutive values (row-major), with one fp32 absmax per
    block; ``double_quant=True`` also quantises the absmax constants to 8 bits (see the module docstring)."""
    _check_quantisable(w, block_size)
    codes, absmax = blockwise_quantize(w, nf4_levels(), block_size)
    q = NF4Tensor(packed=pack_4bit(codes), absmax=absmax, shape=w.shape, dtype=w.dtype, block_size=block_size)
    if double_quant:
        q.absmax, q.absmax_scales, q.absmax_mean = _quantize_absmax(absmax)
    return q


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: c − mean(c) in blocks of 256, each scaled by its absmax and rounded to the nearest 8-bit
    dynamic level. The last block may be shorter: it is padded with zeros, which change no absmax, then cut off."""
    mean = absmax.mean()
    centred = absmax - mean
    padding = -len(centred) % ABSMAX_BLOCK_SIZE
    codes, scales = blockwise_quantize(
        torch.cat([centred, centred.new_zeros(padding)]), dynamic_levels(), ABSMAX_BLOCK_SIZE
    )
    return codes[: len(absmax)], scales, mean


def dequantize_absmax(q: NF4Tensor) -> torch.Tensor:
    """The fp32 constants of ``q``: stored as they are, or rebuilt as dynamic_level[code] · scale + mean."""
    if not q.double_quant:
        return q.absmax
    padding = -len(q.absmax) % ABSMAX_BLOCK_SIZE
    codes = torch.cat([q.absmax, q.absmax.new_zeros(padding)])
    return blockwise_dequantize(codes, q.absmax_scales, dynamic_levels())[: len(q.absmax)] + q.absmax_mean


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """ŵ = nf4_level[code] · absmax of its block, in the shape and dtype of the original tensor (computed in fp32)."""
    values = blockwise_dequantize(unpack_4bit(q.packed), dequantize_absmax(q), nf4_levels())
    return values.reshape(q.shape).to(q.dtype)


def bitsandbytes_state(q: NF4Tensor):
    """The same NF4 tensor in bitsandbytes' form, ``(packed codes, QuantState)``: the codes, the nibble order and
    the constants are identical (tests/test_quant.py), so bitsandbytes' fused kernels can read peftlab's tensors."""
    import bitsandbytes.functional as bnb

    nested = None
    if q.double_quant:
        nested = bnb.QuantState(absmax=q.absmax_scales, code=dynamic_levels().to(q.device),
                                blocksize=ABSMAX_BLOCK_SIZE, dtype=torch.float32)  # fmt: skip
    state = bnb.QuantState(absmax=q.absmax, shape=q.shape, code=nf4_levels().to(q.device), blocksize=q.block_size,
                           quant_type="nf4", dtype=q.dtype, offset=q.absmax_mean, state2=nested)  # fmt: skip
    return q.packed.view(-1, 1), state


def dequantize_nf4_kernel(q: NF4Tensor, state=None) -> torch.Tensor:
    """:func:`dequantize_nf4` by bitsandbytes' fused CUDA kernel (one launch instead of a dozen elementwise ops);
    ``state`` is :func:`bitsandbytes_state`'s, built once. The from-scratch function stays the definition: the
    tests hold the two equal."""
    import bitsandbytes.functional as bnb

    packed, state = state if state is not None else bitsandbytes_state(q)
    return bnb.dequantize_4bit(packed, state)


def bytes_per_parameter(block_size: int = 64, double_quant: bool = False) -> float:
    """Bytes of storage per parameter: 4 bits of code, plus the block's constant shared by ``block_size`` values.

    Without double quantisation: 0.5 + 4 / B (an fp32 constant per block); with it: 0.5 + 1 / B + 4 / (256 · B)
    (an 8-bit constant per block, an fp32 scale per 256 constants; the one mean per tensor is left out).
    B = 64: 0.5625 B and 0.51587 B, i.e. 4.5 and 4.127 bits.
    """
    if double_quant:
        return 0.5 + 1 / block_size + 4 / (ABSMAX_BLOCK_SIZE * block_size)
    return 0.5 + 4 / block_size
