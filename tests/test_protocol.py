"""The method protocol: every registered method by name on every family it applies to, the switch that turns
adapters off, generate on every wrapper, named adapters, and the errors at the boundary."""

import re

import peft
import pytest
import torch
from helpers import call_reference, reference_break
from torch.testing import assert_close

from peftlab import compat, families, models, train
from peftlab.methods import (
    METHOD_NAMES,
    REGISTRY,
    adalora,
    adapter,
    apply_method,
    disabled,
    fusion,
    ia3,
    lora,
    prefix,
    prompt,
    record,
    set_active,
)
from peftlab.methods.layers import ModelWrapper

#: Where a method cannot work, and the sentence that says so: Llama and Mistral have no biases for BitFit.
CANNOT = {("bitfit", "llama"): "has no bias parameters", ("bitfit", "mistral"): "has no bias parameters",
          **{("linear-probe", arch): "reads a BERT sequence classifier's features" for arch in
             ("llama", "qwen2", "mistral", "gpt2")}}  # fmt: skip
GENERATING = ("llama", "gpt2")
#: Configs that fit the tiny models (hidden size 32): an adapter's bottleneck must be narrower than that.
KNOBS_FOR_TINY = {
    "adapter": lambda model: adapter.AdapterConfig(bottleneck=4),
    "adapter-fusion": lambda model: fusion.AdapterFusionConfig(bottleneck=4),
}


def tiny(arch: str):
    return models.tiny_model(arch, task="classification" if arch == "bert" else None)


def batch_for(model) -> dict:
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2]) if model.config.model_type == "bert" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@torch.no_grad()
def randomise_trainable(model, seed: int = 1) -> None:
    """Non-zero values in what the method trains (LoRA's B = 0 would make off and on look alike). A head that trains
    in full, and norms that adapters train, are left alone: they are the model's own, and stay as trained when the
    adapters are off."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad and not any(own in name.lower() for own in ("classifier", "score", "norm", "ln_")):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[:, -batch["input_ids"].shape[1] :] if out.dim() == 3 else out  # soft prompts add positions in front


CASES = [(method, arch) for method in METHOD_NAMES for arch in models.TINY_ARCHITECTURES]


@pytest.mark.parametrize(("method", "arch"), CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_every_method_applies_by_name_records_itself_trains_and_switches_off(method, arch):
    if (method, arch) in CANNOT:
        with pytest.raises(ValueError, match=CANNOT[method, arch]):
            apply_method(tiny(arch), method)
        return
    base = tiny(arch)
    batch = batch_for(base)
    expected = logits(base, batch)
    torch.manual_seed(0)
    model = apply_method(tiny(arch), method, KNOBS_FOR_TINY.get(method, lambda m: None)(base))
    if method == "qlora":  # switched off, a QLoRA model is its 4-bit base: the same model with B = 0
        expected = logits(apply_method(tiny(arch), method), batch)
    # LoRA-FA and LoRA+ are LoRA with other settings; a fusion is recorded with the adapters it fuses
    assert record(model).method == REGISTRY[method].record_name
    randomise_trainable(model)
    adapted = logits(model, batch)
    assert torch.isfinite(adapted).all() and (adapted - expected).abs().max() > 1e-6
    if method in ("full", "freeze", "bitfit", "linear-probe"):  # they train the weights themselves: nothing to switch
        with pytest.raises(ValueError, match="trains the model's own weights"), disabled(model):
            pass
    else:
        with disabled(model):
            assert_close(logits(model, batch), expected, atol=0, rtol=0)  # the base model's logits, exactly
        assert_close(logits(model, batch), adapted, atol=0, rtol=0)
    steps = 40 if method == "adalora" else 3  # AdaLoRA's schedule needs total_steps = max_steps
    if method == "adalora":
        targets = families.family_of(base).lora_targets
        config = adalora.AdaLoRAConfig(total_steps=steps, init_r=4, target_r=2, target_modules=targets)
        model = apply_method(tiny(arch), method, config)
    history = train.train(model, [batch], train.TrainConfig(max_steps=steps, learning_rate=1e-2), progress=False)
    assert all(torch.isfinite(torch.tensor(history.losses)))


def test_the_registry_refuses_an_unknown_method_with_close_names():
    with pytest.raises(ValueError, match=r"Unknown method 'lroa'\. Did you mean 'lora'"):
        apply_method(tiny("llama"), "lroa")


def test_a_family_peftlab_does_not_know_is_refused_naming_the_ones_it_does():
    from transformers import DistilBertConfig, DistilBertModel

    distilbert = DistilBertModel(DistilBertConfig(vocab_size=128, dim=32, n_layers=1, n_heads=4, hidden_dim=64))
    with pytest.raises(ValueError, match=r"LoRA's defaults knows the module layouts of bert, gpt2, llama, mistral, "
                                         r"qwen2 models, not of DistilBertModel .* one entry in"):  # fmt: skip
        apply_method(distilbert, "lora")


def test_qwen2_and_mistral_are_llama_layouts_and_qwen2_has_biases_for_bitfit():
    assert families.family_of(tiny("qwen2")) is families.family_of(tiny("mistral")) is families.LLAMA
    model = apply_method(tiny("qwen2"), "bitfit")
    assert {name.rsplit(".", 2)[-2] for name, p in model.named_parameters() if p.requires_grad} == {
        "q_proj", "k_proj", "v_proj"}  # fmt: skip


def test_disabling_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="has no adapters to switch off: apply a method first"), disabled(tiny("gpt2")):
        pass


# ----------------------------------------------------------------------------------------------------------------
# generate on every wrapper
# ----------------------------------------------------------------------------------------------------------------
def wrapped(kind: str, arch: str):
    base = models.tiny_model(arch)
    config = {"prompt": prompt.PromptTuningConfig(4), "ptuning": prompt.PTuningConfig(4),
              "prefix": prefix.PrefixTuningConfig(4, reparametrize=False)}[kind]  # fmt: skip
    model = (prefix if kind == "prefix" else prompt).apply(base, config)
    randomise_trainable(model, seed=3)
    return model


def greedy_by_forward(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding the slow way, one full forward pass per token: what generate must reproduce."""
    sequence = ids
    for _ in range(new_tokens):
        with torch.no_grad():
            next_logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
        sequence = torch.cat([sequence, next_logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


IDS = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
GENERATE = {"max_new_tokens": 5, "pad_token_id": 0}


@pytest.mark.parametrize("arch", GENERATING)
@pytest.mark.parametrize("kind", ["prompt", "ptuning", "prefix"])
def test_generate_with_and_without_the_cache_gives_the_tokens_of_the_forward_pass(kind, arch):
    model = wrapped(kind, arch)
    expected = greedy_by_forward(model, IDS, 5)
    for use_cache in (True, False):
        assert torch.equal(model.generate(IDS, do_sample=False, use_cache=use_cache, **GENERATE), expected)
    beams = [model.generate(IDS, num_beams=3, use_cache=use_cache, **GENERATE) for use_cache in (True, False)]
    assert torch.equal(*beams) and beams[0].shape == expected.shape
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        samples.append(model.generate(IDS, do_sample=True, top_k=10, num_return_sequences=2, use_cache=use_cache,
                                      **GENERATE))  # fmt: skip
    assert torch.equal(*samples) and samples[0].shape == (4, 10)
    with disabled(model):
        assert torch.equal(model.generate(IDS, do_sample=False, **GENERATE),
                           models.tiny_model(arch).generate(IDS, do_sample=False, **GENERATE))  # fmt: skip


def peft_twin(kind: str, model):
    config = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}[kind]
    theirs = peft.get_peft_model(models.tiny_model(model.config.model_type), config(task_type="CAUSAL_LM",
                                                                                    num_virtual_tokens=4))  # fmt: skip
    mine = model.soft_prompt if kind == "prompt" else model.prefix_encoder.embedding.weight
    theirs.prompt_encoder["default"].embedding.weight.data.copy_(mine.detach())
    return theirs


@pytest.mark.parametrize("arch", GENERATING)
def test_prompt_tuned_generate_equals_peft_greedy_and_beams(arch):
    model = wrapped("prompt", arch)
    theirs = peft_twin("prompt", model)
    for settings in ({"do_sample": False}, {"num_beams": 3}):
        ours = model.generate(IDS, attention_mask=torch.ones_like(IDS), **settings, **GENERATE)
        assert torch.equal(ours, theirs.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **settings,
                                                 **GENERATE))  # fmt: skip


GENERATE_BREAK = compat.PEFT_PREFIX_GENERATE


@reference_break(GENERATE_BREAK)
@pytest.mark.parametrize("arch", GENERATING)
def test_prefix_tuned_generate_equals_peft(arch):
    """Taught as a pitfall in notebook 05: under the releases the known break names, peft's prefix-tuned generate
    returns the base model's tokens (its forward pass is right); peftlab's generate follows its forward pass."""
    model = wrapped("prefix", arch)
    ours = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, **GENERATE)
    assert torch.equal(ours, greedy_by_forward(model, IDS, 5))  # peftlab's side works
    theirs = peft_twin("prefix", model)

    def peft_generate():
        tokens = theirs.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), do_sample=False, **GENERATE)
        if not torch.equal(tokens, ours):
            raise AssertionError(f"{GENERATE_BREAK.message} (peft {tokens.tolist()}, peftlab {ours.tolist()})")
        return tokens

    call_reference(GENERATE_BREAK, peft_generate)


def test_generate_on_an_encoder_says_there_is_nothing_to_generate():
    encoder = prompt.apply(models.tiny_model("bert", task="classification"), prompt.PromptTuningConfig(4))
    with pytest.raises(TypeError, match="not a causal LM: it has nothing to generate"):
        encoder.generate(IDS)


# ----------------------------------------------------------------------------------------------------------------
# Named adapters beyond LoRA
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("module", "config"), [(ia3, ia3.IA3Config()), (adapter, adapter.AdapterConfig(bottleneck=4))],
                         ids=["ia3", "adapter"])  # fmt: skip
def test_two_named_adapters_compute_and_train_apart(module, config):
    model = module.apply(models.tiny_model("llama"), config, adapter="a")
    model = module.apply(model, config, adapter="b")
    batch = batch_for(model)
    randomise_trainable(model, seed=1)  # b is active: a keeps its start (the base model's outputs)
    set_active(model, "a")
    randomise_trainable(model, seed=2)
    outputs = {}
    for name in ("a", "b"):
        set_active(model, name)
        outputs[name] = logits(model, batch)
        trained = [n for n, p in model.named_parameters() if p.requires_grad and "norm" not in n]
        assert trained and all(re.search(rf"\.{name}(\.|$)", n) for n in trained)
    assert (outputs["a"] - outputs["b"]).abs().max() > 1e-4
    set_active(model, ["a", "b"])  # both at once: (IA)³ multiplies the vectors, adapters run one after the other
    both = logits(model, batch)
    assert (both - outputs["a"]).abs().max() > 1e-4 and (both - outputs["b"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="No adapter named 'c'"):
        set_active(model, "c")


def test_one_method_per_model_and_one_prompt_per_model():
    model = ia3.apply(models.tiny_model("llama"), ia3.IA3Config())
    with pytest.raises(ValueError, match="already carries ia3; adapter on top of it is not supported"):
        adapter.apply(model, adapter.AdapterConfig(bottleneck=4))
    wrapped_model = prompt.apply(models.tiny_model("llama"), prompt.PromptTuningConfig(4))
    with pytest.raises(TypeError, match="not to an already wrapped one"):
        prefix.apply(wrapped_model, prefix.PrefixTuningConfig(4))


def head_of(model):
    """The classification head, under a soft-prompt or prefix wrapper too."""
    return prompt.classification_head(model.base_model if isinstance(model, ModelWrapper) else model)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_on_a_classifier_every_method_trains_the_new_head_by_default(method):
    """One decision for every method, as peft's SEQ_CLS makes it: a randomly initialised head must learn."""
    model = apply_method(tiny("bert"), method, KNOBS_FOR_TINY.get(method, lambda m: None)(tiny("bert")))
    assert all(p.requires_grad for p in head_of(model).parameters())


FROZEN_HEAD = {
    "lora": (lora, lora.LoRAConfig(r=2, target_modules=("query",), modules_to_save=())),
    "ia3": (ia3, ia3.IA3Config(modules_to_save=())),
    "adapter": (adapter, adapter.AdapterConfig(bottleneck=4, train_head=False)),
    "prompt": (prompt, prompt.PromptTuningConfig(4, train_head=False)),
    "ptuning-v2": (prefix, prefix.PTuningV2Config(4, train_head=False)),
}


@pytest.mark.parametrize("method", FROZEN_HEAD)
def test_the_head_stays_frozen_when_asked(method):
    module, config = FROZEN_HEAD[method]
    assert not any(p.requires_grad for p in head_of(module.apply(tiny("bert"), config)).parameters())
