"""NF4 from scratch, checked with numbers against bitsandbytes (run on the CPU): the same 16 levels, the same codes,
bytes and constants, the same dequantised weights; double quantisation within a stated tolerance; NF4 beats a
uniform 4-bit code on normal data; and the memory formulas of the QLoRA paper."""

import bitsandbytes.functional as bnb
import pytest
import torch

from peftlab import quant


def normal_weight(shape=(256, 512), std=0.02, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return std * torch.randn(shape, generator=generator)


def mse(a, b):
    return ((a - b) ** 2).mean().item()


# ----------------------------------------------------------------------------------------------------------------
# The codes
# ----------------------------------------------------------------------------------------------------------------
def test_nf4_levels_are_those_of_bitsandbytes():
    levels = quant.nf4_levels()
    theirs = bnb.get_4bit_type("nf4", device="cpu")  # the table in bitsandbytes/functional.py
    torch.testing.assert_close(levels, theirs, atol=1e-6, rtol=0)  # measured: 6e-8 (float32 icdf vs scipy)
    assert levels.shape == (16,) and torch.equal(levels, levels.sort().values)
    assert (levels[0], levels[7], levels[15]) == (-1, 0, 1)  # an exact 0; 7 levels below it, 8 above


def test_dynamic_levels_are_those_of_bitsandbytes():
    levels = quant.dynamic_levels()
    assert torch.equal(levels, bnb.create_dynamic_map())
    assert levels.shape == (256,) and levels.max() == 1 and levels[levels > 0].min() == pytest.approx(5.5e-7)


def test_packing_puts_the_first_code_in_the_high_nibble():
    codes = torch.tensor([1, 2, 15, 0, 7, 9], dtype=torch.uint8)
    packed = quant.pack_4bit(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x79]
    assert torch.equal(quant.unpack_4bit(packed), codes)


def test_the_levels_themselves_come_back_exactly():
    levels = quant.nf4_levels()
    w = torch.cat([levels, 0.5 * levels, torch.zeros(16), 0.25 * levels]).reshape(4, 16)  # 4 blocks of 16
    q = quant.quantize_nf4(w, block_size=16)
    assert q.absmax.tolist() == [1, 0.5, 0, 0.25]  # an all-zero block has absmax 0 and stays 0
    assert torch.equal(quant.dequantize_nf4(q), w)


# ----------------------------------------------------------------------------------------------------------------
# Same numbers as bitsandbytes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_nf4_gives_the_codes_constants_and_weights_of_bitsandbytes(dtype):
    w = normal_weight().to(dtype)
    q = quant.quantize_nf4(w, block_size=64)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed.flatten())  # same codes, same nibble order
    assert torch.equal(q.absmax, state.absmax)
    ours, theirs = quant.dequantize_nf4(q), bnb.dequantize_4bit(packed, state)
    assert ours.shape == w.shape and ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-6, rtol=0)  # measured: 7e-9 in fp32


def test_double_quant_matches_bitsandbytes_compress_statistics():
    w = normal_weight()
    q = quant.quantize_nf4(w, double_quant=True)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, packed.flatten())
    assert torch.equal(q.absmax_scales, state.state2.absmax)  # 2048 constants → 8 blocks of 256, fp32 scales
    assert q.absmax_mean.item() == pytest.approx(state.offset.item(), rel=1e-6)
    # The 8-bit codes of the constants: bitsandbytes' CPU kernel searches the 256 levels approximately, so 2 of the
    # 2048 constants, lying almost halfway between two levels, get the other neighbour (ours is the nearest).
    differ = q.absmax != state.absmax
    assert differ.sum() <= 4 and (q.absmax.int() - state.absmax.int()).abs().max() <= 1
    ours, theirs = quant.dequantize_nf4(q), bnb.dequantize_4bit(packed, state)
    same_blocks = ~differ
    torch.testing.assert_close(
        ours.reshape(-1, 64)[same_blocks], theirs.reshape(-1, 64)[same_blocks], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)  # measured: 5e-4 in the 2 blocks, one level apart


def test_double_quant_barely_adds_error():
    w = normal_weight()
    single, double = quant.quantize_nf4(w), quant.quantize_nf4(w, double_quant=True)
    constants = quant.dequantize_absmax(double)
    assert ((constants - single.absmax).abs() / single.absmax).max() < 0.02  # measured: 0.8 %
    assert mse(quant.dequantize_nf4(double), w) < 1.001 * mse(quant.dequantize_nf4(single), w)  # +0.04 %


def test_a_last_short_block_of_constants_is_quantised_as_bitsandbytes_does():
    w = normal_weight((100, 64))  # 100 constants: one block of 256 holding only 100
    q = quant.quantize_nf4(w, double_quant=True)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.absmax, state.absmax) and q.absmax_scales.shape == (1,)
    torch.testing.assert_close(quant.dequantize_nf4(q), bnb.dequantize_4bit(packed, state), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Error and memory
# ----------------------------------------------------------------------------------------------------------------
def test_nf4_has_a_lower_error_than_uniform_int4_on_normal_weights():
    """Same blocks of 64, same absmax: only the 16 levels differ. int4 is bitsandbytes' "int4" type, k / 7."""
    w = normal_weight()
    nf4 = mse(quant.dequantize_nf4(quant.quantize_nf4(w)), w)
    int4_levels = torch.arange(-7, 8) / 7
    codes, absmax = quant.blockwise_quantize(w, int4_levels, block_size=64)
    int4 = mse(quant.blockwise_dequantize(codes, absmax, int4_levels).reshape(w.shape), w)
    assert nf4 == pytest.approx(3.40e-6, rel=0.01) and int4 == pytest.approx(4.65e-6, rel=0.01)
    assert nf4 < 0.75 * int4  # 27 % lower; relative to the weights' variance 0.85 % against 1.16 %


def test_packed_codes_take_half_a_byte_per_value_and_nbytes_is_real():
    w = normal_weight()
    single, double = quant.quantize_nf4(w), quant.quantize_nf4(w, double_quant=True)
    n, blocks = w.numel(), w.numel() // 64
    assert single.packed.dtype == torch.uint8 and single.packed.numel() == n // 2
    assert single.nbytes == n // 2 + 4 * blocks == 73_728
    assert double.absmax.dtype == torch.uint8
    assert double.nbytes == n // 2 + blocks + 4 * (blocks // 256) + 4 == 67_620
    assert single.nbytes / n == quant.bytes_per_parameter(64) == 0.5625
    assert double.nbytes / n == pytest.approx(quant.bytes_per_parameter(64, double_quant=True), abs=1e-4)


def test_bytes_per_parameter_gives_the_numbers_of_the_qlora_paper():
    without, with_dq = quant.bytes_per_parameter(64), quant.bytes_per_parameter(64, double_quant=True)
    assert without == 0.5 + 4 / 64 == 0.5625
    assert with_dq == 0.5 + 1 / 64 + 4 / (64 * 256) == pytest.approx(0.51587, abs=1e-5)
    # Section 3: the constants cost 32/64 = 0.5 bits per parameter, 8/64 + 32/(64·256) = 0.127 bits with DQ,
    # a saving of 0.373 bits per parameter.
    assert 8 * (without - 0.5) == 0.5
    assert 8 * (with_dq - 0.5) == pytest.approx(0.127, abs=5e-4)
    assert 8 * (without - with_dq) == pytest.approx(0.373, abs=5e-4)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def test_a_block_size_that_does_not_divide_the_tensor_is_refused_with_a_fix():
    message = r"block_size=64 does not divide the 100 values of the tensor \(shape \(10, 10\)\): choose a block size"
    with pytest.raises(ValueError, match=message + r" that divides 100 \(the largest power of two that does is 4\)"):
        quant.quantize_nf4(torch.randn(10, 10))
    for block_size in (0, 7, 64.0, True):
        with pytest.raises(ValueError, match="block_size must be an even whole number"):
            quant.quantize_nf4(torch.randn(8, 8), block_size=block_size)


@pytest.mark.parametrize("w", [torch.ones(4, 16, dtype=torch.int64), torch.ones(4, 16, dtype=torch.bool), [1.0] * 64])
def test_non_floating_input_is_refused(w):
    with pytest.raises(TypeError, match=r"NF4 quantises floating-point tensors \(float32, float16, bfloat16\)"):
        quant.quantize_nf4(w, block_size=16)


def test_nan_weights_and_codes_past_15_are_refused():
    weight = torch.randn(4, 64)
    weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match="holds 1 NaN or infinite value"):
        quant.quantize_nf4(weight)
    with pytest.raises(ValueError, match="got values from 0 to 16: a code above 15 would overwrite"):
        quant.pack_4bit(torch.tensor([0, 16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="an odd number"):
        quant.pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8))
    with pytest.raises(TypeError, match="integer codes"):
        quant.pack_4bit(torch.tensor([0.5, 1.0]))
