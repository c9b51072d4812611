"""Bad input to the memory estimator is refused at the boundary, with what to change."""

import pytest

from peftlab import memory, models
from peftlab.methods import lora, qlora


def test_qlora_takes_its_own_config():
    config = qlora.QLoRAConfig(lora=lora.LoRAConfig(r=4, target_modules=("q_proj", "v_proj")))
    estimate = memory.estimate("smollm2-135m", memory.Setup(method="qlora", method_config=config, precision="nf4"))
    assert estimate.trainable_parameters == 30 * 4 * ((576 + 576) + (576 + 192))


def test_a_config_of_the_wrong_kind_is_refused_naming_the_right_one():
    with pytest.raises(TypeError, match="lora takes a LoRAConfig, got dict"):
        memory.estimate("smollm2-135m", memory.Setup(method="lora", method_config={"r": 8}))
    with pytest.raises(TypeError, match=r"estimate takes a memory.Setup, got dict: memory.Setup\(method=\.\.\."):
        memory.estimate("smollm2-135m", {"method": "lora"})


def test_an_unknown_gpu_lists_the_known_ones():
    estimate = memory.estimate("smollm2-135m", memory.Setup(method="lora"))
    with pytest.raises(ValueError, match="Unknown GPU 'RTX 4090'; known: T4 16 GB"):
        estimate.fits("RTX 4090")


def test_a_sequence_past_learned_positions_is_refused():
    with pytest.raises(ValueError, match=r"seq_len=2048 is past the model.s 1024 positions"):
        memory.estimate("gpt2", memory.Setup(method="lora", seq_len=2048))
    with pytest.raises(ValueError, match=r"seq_len=500 \+ 20 virtual tokens is past the model's 512 positions"):
        memory.estimate("bert-base", memory.Setup(method="prompt", seq_len=500))


def test_applied_needs_a_model_that_carries_the_method():
    with pytest.raises(ValueError, match="applied=True, but the model carries no method, not 'lora'"):
        memory.estimate(models.tiny_model("llama"), memory.Setup(method="lora"), applied=True)
    model = lora.apply(models.tiny_model("llama"), lora.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="carries lora, not 'ia3'"):
        memory.estimate(model, memory.Setup(method="ia3", device="cpu"), applied=True)
    assert memory.estimate(model, memory.Setup(method="lora", device="cpu"), applied=True).trainable_parameters > 0


def test_an_unknown_method_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown method 'qlroa'\. Did you mean 'qlora'"):
        memory.Setup(method="qlroa")
