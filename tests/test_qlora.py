"""QLoRA, checked with numbers: a QLoRA model computes exactly what LoRA computes on the dequantised NF4 weights,
stays close to the full-precision model, stores about 1/8 of the fp32 bytes of the layers it quantises, and trains
A and B only, leaving the 4-bit codes as they were."""

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftlab import memory, models, quant, train
from peftlab.methods import lora, qlora
from peftlab.methods.lora import LoRAConfig
from peftlab.methods.qlora import QLoRAConfig
from peftlab.params import ParameterCount, count_parameters, parameter_table
from peftlab.quant import dequantize_nf4

# tiny llama's linear layers (q/o 32×32, k/v 16×32, gate/up 64×32, down 32×64): every weight is a multiple of 64.
CONFIG = QLoRAConfig(lora=LoRAConfig(r=4, alpha=8, target_modules="all-linear"), block_size=64, double_quant=True)


def token_ids(model, n=2, length=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, length), generator=generator)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@torch.no_grad()
def randomise_lora(model, seed=1):
    """Random non-zero A and B (B = 0 would make the LoRA path vanish from every comparison)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def twins(arch):
    """A QLoRA model and a LoRA model whose base weights are the QLoRA model's dequantised NF4 weights."""
    quantised = qlora.apply(models.tiny_model(arch), CONFIG)
    randomise_lora(quantised)
    reference = lora.apply(models.tiny_model(arch), CONFIG.lora)
    with torch.no_grad():
        for name, layer in lora.lora_layers(reference).items():
            twin = quantised.get_submodule(name)
            weight = dequantize_nf4(twin.base_layer.weight)
            layer.base_layer.weight.copy_(weight.T if layer.fan_in_fan_out else weight)
            layer.lora_A["default"].weight.copy_(twin.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(twin.lora_B["default"].weight)
    return quantised, reference


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_are_those_of_lora_on_the_dequantised_weights(arch):
    """GPT-2's Conv1D weights ([in, out]) are quantised transposed, as [out, in]."""
    quantised, reference = twins(arch)
    ids = token_ids(quantised)
    torch.testing.assert_close(logits(quantised, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_gradients_equal_and_no_dequantised_weight_is_saved_for_backward():
    """The backward pass dequantises again instead of keeping a 16/32-bit copy of every frozen weight."""
    quantised, reference = twins("llama")
    ids = token_ids(quantised)
    for model in (quantised, reference):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    for name, layer in lora.lora_layers(reference).items():
        mine = quantised.get_submodule(name).lora_A["default"].weight.grad
        torch.testing.assert_close(mine, layer.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
    batch = {"input_ids": ids, "labels": ids}
    assert memory.saved_tensor_bytes(quantised, batch) <= memory.saved_tensor_bytes(reference, batch)


def test_logits_are_close_to_the_full_precision_model():
    """B = 0 at the start: the only difference is NF4's rounding of every linear weight of the blocks."""
    full = models.tiny_model("llama")
    quantised = qlora.apply(models.tiny_model("llama"), CONFIG)
    ids = token_ids(full)
    exact, approx = logits(full, ids), logits(quantised, ids)
    relative = ((approx - exact).norm() / exact.norm()).item()
    assert 0 < relative < 0.1  # measured: 5.8 % (random N(0, 0.02) weights: NF4 rounds each by about 9 %)


def test_the_4bit_base_holds_an_eighth_of_the_fp32_bytes():
    full = models.tiny_model("llama")
    numels = [m.weight.numel() for n, m in full.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    quantised = qlora.apply(models.tiny_model("llama"), CONFIG)
    assert len(qlora.quantized_layers(quantised)) == len(numels) == 14
    # per layer: ½ byte per weight, one 8-bit constant per 64, one fp32 scale per 256 constants, one fp32 mean
    expected = sum(n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 for n in numels)
    fp32 = 4 * sum(numels)
    assert qlora.weight_bytes(quantised) == expected == 9_616 and fp32 == 73_728
    assert 0.125 < expected / fp32 < 0.131  # 0.1304: 1/8 plus the constants (0.516 / 4 = 0.129) plus 14 means
    without_dq = qlora.apply(models.tiny_model("llama"), QLoRAConfig(lora=CONFIG.lora, double_quant=False))
    assert qlora.weight_bytes(without_dq) == sum(n // 2 + 4 * (n // 64) for n in numels) == 10_368  # 0.1406


def test_no_full_precision_weight_is_kept_and_embeddings_and_head_are_not_quantised():
    model = qlora.apply(models.tiny_model("llama"), CONFIG)
    keys = model.state_dict().keys()
    assert not any("base_layer.weight" in key for key in keys)
    assert {key.rsplit(".", 1)[-1] for key in keys if ".base_layer." in key} == {
        "packed", "absmax", "absmax_scales", "absmax_mean"
    }  # fmt: skip
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert model.model.layers[0].self_attn.q_proj.base_layer.packed.dtype == torch.uint8


def test_training_lowers_the_loss_moves_only_lora_and_leaves_the_codes_unchanged():
    model = qlora.apply(models.tiny_model("llama"), CONFIG)
    codes = {name: buffer.clone() for name, buffer in model.named_buffers() if ".base_layer." in name}
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert all("lora_" in name for name, param in model.named_parameters() if param.requires_grad)
    ids = token_ids(model, n=4, length=12)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    config = train.TrainConfig(max_steps=5, learning_rate=1e-2, schedule="constant")
    history = train.train(model, batches, config, progress=False)
    assert history.losses[-1] < history.losses[0]
    assert (
        history.trainable_parameters
        == count_parameters(model).trainable
        == 2 * sum(4 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    )
    for name, buffer in model.named_buffers():
        if name in codes:
            assert torch.equal(buffer, codes[name]), name
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != ("lora_" in name), name  # LoRA moved, everything else did not


def test_quantised_weights_count_as_frozen_parameters():
    """Linear4bit keeps its NF4 codes as buffers: the count must not lose them (the share would look ~2x larger)."""
    full = models.tiny_model("llama")
    model = qlora.apply(models.tiny_model("llama"), CONFIG)
    lora_numel = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert count_parameters(model).total == count_parameters(full).total + lora_numel
    assert count_parameters(model).trainable == lora_numel
    listed = sum(p.numel() for p in model.parameters())  # what a naive count sees: the quantised weights are gone
    assert listed < count_parameters(model).total
    table = parameter_table(model).set_index("name")
    row = table.loc["model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (row["shape"], row["numel"], row["trainable"], row["kind"]) == ((32, 32), 1024, False, "attention")


def test_a_bitsandbytes_4bit_parameter_counts_the_values_it_stands_for():
    """bitsandbytes' Params4bit is a parameter of numel/2 packed bytes with the matrix's shape in its quant_state."""
    layer = torch.nn.Linear(32, 16, bias=False)
    packed = torch.nn.Parameter(torch.zeros(256, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = dataclasses.make_dataclass("QuantState", ["shape"])(torch.Size([16, 32]))
    layer.weight = packed
    assert count_parameters(layer) == ParameterCount(trainable=0, total=512)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_adapter_saves_as_lora_and_merges_into_the_full_precision_model(arch, tmp_path):
    """For GPT-2 the saved config says fan_in_fan_out=True: the layout of the full-precision Conv1D it merges into."""
    model = qlora.apply(models.tiny_model(arch), CONFIG)
    randomise_lora(model)
    with pytest.raises(RuntimeError, match="merging here would quantise ΔW away"):
        lora.merge(model)
    lora.save(model, tmp_path)
    full = lora.merge(lora.load(models.tiny_model(arch), tmp_path))
    ids = token_ids(model)
    relative = ((logits(full, ids) - logits(model, ids)).norm() / logits(full, ids).norm()).item()
    assert relative < 0.1  # only NF4's rounding of the base differs


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def test_a_block_size_that_does_not_divide_a_target_is_refused_naming_the_layer():
    model = models.tiny_model("llama")
    message = (r"block_size=1024 does not divide the weight of model\.layers\.0\.self_attn\.k_proj \(16 × 32 = 512 "
               r"values\)\. Choose a block_size that divides every target's weight \(64 does here\)")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        qlora.apply(model, QLoRAConfig(lora=CONFIG.lora, block_size=1024))
    assert not lora.lora_layers(model) and count_parameters(model).trainable == count_parameters(model).total
    qlora.apply(model, QLoRAConfig(lora=LoRAConfig(target_modules=("q_proj",)), block_size=1024))  # q: 1024 values


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [({"block_size": 63}, ValueError, "must be even"), ({"block_size": 0}, ValueError, "at least 2"),
     ({"compute_dtype": torch.int8}, ValueError, "floating dtype"), ({"lora": {"r": 8}}, TypeError, "a LoRAConfig")],
)  # fmt: skip
def test_bad_configs_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        QLoRAConfig(**kwargs)


def test_a_meta_model_and_a_lora_config_are_refused():
    with pytest.raises(ValueError, match="on the meta device: QLoRA quantises real weights"):
        qlora.apply(models.meta_model("smollm2-135m"), CONFIG)
    with pytest.raises(TypeError, match=r"qlora\.apply takes a QLoRAConfig, got LoRAConfig"):
        qlora.apply(models.tiny_model("llama"), CONFIG.lora)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_kernel_dequantises_peftlabs_own_tensors_to_the_same_weights(double_quant):
    """The trained path may dequantise with bitsandbytes' fused kernel (kernel="bitsandbytes", or "auto" on CUDA):
    it reads peftlab's very tensors, and gives the from-scratch weights."""
    weight = 0.02 * torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q = quant.quantize_nf4(weight, double_quant=double_quant)
    torch.testing.assert_close(quant.dequantize_nf4_kernel(q), quant.dequantize_nf4(q), atol=1e-6, rtol=0)
    config = qlora.QLoRAConfig(lora=LoRAConfig(r=4, target_modules=("q_proj", "v_proj")), double_quant=double_quant)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    # 64 wide: bitsandbytes' CPU kernel misreads rows shorter than a block of 64 (its CUDA kernel does not), which
    # is why "auto" uses it on CUDA only
    wide = models.tiny_config("llama")
    wide.hidden_size, wide.intermediate_size = 64, 128
    logits = {}
    for kernel in ("peftlab", "bitsandbytes"):
        torch.manual_seed(0)
        model = qlora.apply(AutoModelForCausalLM.from_config(wide), dataclasses.replace(config, kernel=kernel))
        logits[kernel] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["bitsandbytes"], logits["peftlab"], atol=1e-5, rtol=0)
    auto = qlora.apply(models.tiny_model("llama"), config)
    assert not next(iter(qlora.quantized_layers(auto).values()))._uses_kernel()  # on a CPU, auto is from scratch
    with pytest.raises(ValueError, match="Unknown kernel 'triton'"):
        qlora.QLoRAConfig(kernel="triton")
