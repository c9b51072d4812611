"""LoRA, checked with numbers against peft: the same A and B give the same outputs, merging gives peft's merged
weights, adapters load both ways, the LoRA+ groups are peft's, and the parameter counts are the closed forms."""

import json
import re

import peft
import pytest
import torch
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from transformers import AutoModelForCausalLM

from peftlab import models, train
from peftlab.methods import disabled, ia3, layers, lora, set_active
from peftlab.methods.lora import LoRAConfig
from peftlab.params import count_parameters

TARGETS = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value")}
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def token_ids(model, n=2, length=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, length), generator=generator)


@torch.no_grad()
def outputs(model, ids):
    """Logits of a model with a head, the last hidden state of a bare encoder."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if "logits" in out else out.last_hidden_state


def peft_name(name):
    """peftlab's name → peft's in memory: the same name under peft's ``base_model.model.``."""
    return lora.PEFT_PREFIX + name


@torch.no_grad()
def randomise(model, seed=1):
    """Random non-zero values in every trainable tensor (B = 0 would make every comparison pass trivially)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def peft_twin(arch, config, task=None):
    """The same tiny model with LoRA from peftlab and from peft, holding the same random non-zero A and B."""
    ours = lora.apply(models.tiny_model(arch, task=task), config)
    theirs = peft.get_peft_model(
        models.tiny_model(arch, task=task),
        peft.LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                        use_rslora=config.use_rslora),
    )  # fmt: skip
    randomise(ours)
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                their_params[peft_name(name)].copy_(param)
    return ours, theirs


# ----------------------------------------------------------------------------------------------------------------
# Same numbers as peft
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "use_rslora"), [("llama", False), ("gpt2", False), ("bert", False), ("llama", True)])
def test_same_adapters_give_the_outputs_of_peft(arch, use_rslora):
    config = LoRAConfig(r=4, alpha=8, target_modules=TARGETS[arch], use_rslora=use_rslora)
    ours, theirs = peft_twin(arch, config)
    ids = token_ids(ours)
    torch.testing.assert_close(outputs(ours, ids), outputs(theirs, ids), **TOLERANCE)
    assert (outputs(ours, ids) - outputs(models.tiny_model(arch), ids)).abs().max() > 1e-2  # LoRA does something


def test_rslora_scales_by_alpha_over_root_r_as_peft_does():
    config = LoRAConfig(r=16, alpha=8, use_rslora=True)
    ours, theirs = peft_twin("llama", config)
    their_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "scaling")}
    for name, layer in lora.lora_layers(ours).items():
        assert layer.scaling["default"] == config.scaling == 8 / 16**0.5 == their_layers[name].scaling["default"]
    assert LoRAConfig(r=16, alpha=8).scaling == 0.5


def test_with_the_same_seed_A_starts_as_in_peft_and_B_at_zero():
    torch.manual_seed(7)
    ours = lora.apply(models.tiny_model("gpt2"), LoRAConfig(r=4, target_modules=("c_attn",)))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(models.tiny_model("gpt2"), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, their_params[peft_name(name)]), name
            assert ("lora_B" in name) == (not param.any())


# ----------------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_gives_peft_merged_weights_and_the_same_outputs(arch):
    ours, theirs = peft_twin(arch, LoRAConfig(r=4, alpha=8, target_modules=TARGETS[arch]))
    ids = token_ids(ours)
    before = outputs(ours, ids)
    base = {name: layer.base_layer.weight.clone() for name, layer in lora.lora_layers(ours).items()}
    lora.merge(ours)
    unloaded = theirs.merge_and_unload()
    for name, layer in lora.lora_layers(ours).items():
        assert layer.merged
        torch.testing.assert_close(layer.base_layer.weight, unloaded.get_submodule(name).weight, **TOLERANCE)
    torch.testing.assert_close(outputs(ours, ids), before, **TOLERANCE)
    lora.unmerge(ours)
    for name, layer in lora.lora_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, base[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs(ours, ids), before, **TOLERANCE)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_and_unload_equals_peft_merge_and_unload(arch):
    ours, theirs = peft_twin(arch, LoRAConfig(r=4, alpha=8, target_modules=TARGETS[arch]))
    ids = token_ids(ours)
    unloaded_theirs = theirs.merge_and_unload()
    unloaded = lora.merge_and_unload(ours)
    assert not lora.lora_layers(unloaded) and layers.record(unloaded) is None
    assert set(unloaded.state_dict()) == set(unloaded_theirs.state_dict())  # the base model's names, as peft's
    for name, weight in unloaded_theirs.state_dict().items():
        torch.testing.assert_close(unloaded.state_dict()[name], weight, **TOLERANCE, msg=name)
    torch.testing.assert_close(outputs(unloaded, ids), outputs(unloaded_theirs, ids), **TOLERANCE)


def test_merging_twice_unmerging_unmerged_and_merging_a_plain_model_are_refused():
    model = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4))
    with pytest.raises(RuntimeError, match="not merged: there is nothing to unmerge"):
        lora.unmerge(model)
    lora.merge(model)
    with pytest.raises(RuntimeError, match="already merged: merging twice would apply it twice"):
        lora.merge(model)
    with pytest.raises(ValueError, match=r"has no LoRA layers: apply LoRA first"):
        lora.merge(models.tiny_model("llama"))


# ----------------------------------------------------------------------------------------------------------------
# Parameter counts and training
# ----------------------------------------------------------------------------------------------------------------
def test_trainable_count_is_the_closed_form_and_only_lora_trains():
    model = models.tiny_model("llama")
    c = model.config
    d, kv_dim, r = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads, 4
    lora.apply(model, LoRAConfig(r=r, target_modules=("q_proj", "v_proj")))
    expected = c.num_hidden_layers * (r * (d + d) + r * (d + kv_dim))
    per_layer = lora.lora_parameter_count(d, d, r) + lora.lora_parameter_count(d, kv_dim, r)
    assert expected == c.num_hidden_layers * per_layer
    assert count_parameters(model).trainable == expected == 2 * (4 * 64 + 4 * 48)
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)


def test_lora_fa_halves_the_trainable_count_of_square_layers():
    full = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4, target_modules=("q_proj",)))
    fa = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4, target_modules=("q_proj",), freeze_A=True))
    assert count_parameters(fa).trainable * 2 == count_parameters(full).trainable == 2 * 4 * (32 + 32)


def test_lora_fa_training_moves_B_only():
    model = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4, freeze_A=True))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = token_ids(model, n=4, length=12)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    config = train.TrainConfig(max_steps=3, learning_rate=1e-2, schedule="constant")
    history = train.train(model, batches, config, progress=False)
    assert history.trainable_parameters == count_parameters(model).trainable
    for name, param in model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(param, before[name]), name
        else:  # A and every base weight: bit-identical
            assert torch.equal(param, before[name]), name


def test_counts_a_real_architecture_on_the_meta_device():
    model = lora.apply(models.meta_model("llama-2-7b"), LoRAConfig(r=8, target_modules=("q_proj", "v_proj")))
    assert count_parameters(model).trainable == 4_194_304 == 32 * 2 * lora.lora_parameter_count(4096, 4096, 8)
    assert all(p.is_meta for name, p in model.named_parameters() if "lora_" in name)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_all_linear_and_regex_choose_the_layers_peft_chooses(arch):
    for targets in ["all-linear", r".*\.0\..*(q_proj|v_proj|c_attn|query|value)"]:
        ours = lora.apply(models.tiny_model(arch), LoRAConfig(r=2, target_modules=targets))
        theirs = peft.get_peft_model(models.tiny_model(arch), peft.LoraConfig(r=2, target_modules=targets))
        their_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
        assert set(lora.lora_layers(ours)) == their_names
    assert not any("lm_head" in name for name in lora.lora_layers(ours))


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading in peft's format
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "task"), [("llama", None), ("gpt2", None), ("bert", None), ("bert", "classification")]
)
def test_saved_adapter_loads_in_peft(arch, task, tmp_path):
    """The classification case also trains and saves its head (modules_to_save), as peft's SEQ_CLS does."""
    heads = ("classifier",) if task else ()
    config = LoRAConfig(r=4, alpha=8, target_modules=TARGETS[arch], modules_to_save=heads)
    ours = lora.apply(models.tiny_model(arch, task=task), config)
    randomise(ours)  # A, B and the head
    lora.save(ours, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"], saved["bias"]) == ("LORA", 4, 8, "none")
    assert saved["fan_in_fan_out"] == (arch == "gpt2")
    assert saved["task_type"] == ("SEQ_CLS" if task else {"bert": "FEATURE_EXTRACTION"}.get(arch, "CAUSAL_LM"))
    theirs = peft.PeftModel.from_pretrained(models.tiny_model(arch, task=task), tmp_path / "adapter")
    ids = token_ids(ours)
    torch.testing.assert_close(outputs(theirs, ids), outputs(ours, ids), **TOLERANCE)


@pytest.mark.parametrize(("arch", "task"), [("llama", None), ("gpt2", None), ("bert", "classification")])
def test_peft_adapter_loads_here(arch, task, tmp_path):
    """A SEQ_CLS adapter from peft also holds its trained classifier: it is loaded and trains here too."""
    task_type = "SEQ_CLS" if task else None
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS[arch]), task_type=task_type)
    theirs = peft.get_peft_model(models.tiny_model(arch, task=task), config)
    randomise(theirs)  # A, B and (for SEQ_CLS) the classifier
    theirs.save_pretrained(tmp_path / "adapter")
    ours = lora.load(models.tiny_model(arch, task=task), tmp_path / "adapter")
    ids = token_ids(ours)
    torch.testing.assert_close(outputs(ours, ids), outputs(theirs, ids), **TOLERANCE)
    assert count_parameters(ours).trainable == count_parameters(theirs).trainable


def test_load_into_a_model_that_already_has_the_same_lora(tmp_path):
    config = LoRAConfig(r=4, alpha=8)
    source = lora.apply(models.tiny_model("llama"), config)
    randomise(source)
    lora.save(source, tmp_path)
    target = lora.load(lora.apply(models.tiny_model("llama"), config), tmp_path)
    ids = token_ids(source)
    torch.testing.assert_close(outputs(target, ids), outputs(source, ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="adapter 'default' has r=8, scaling=2, the saved one r=4, scaling=2"):
        lora.load(lora.apply(models.tiny_model("llama"), LoRAConfig()), tmp_path)


def test_save_refuses_to_overwrite_unless_told(tmp_path):
    model = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4))
    lora.save(model, tmp_path / "adapter")
    with pytest.raises(FileExistsError, match="is not empty: pass overwrite=True"):
        lora.save(model, tmp_path / "adapter")
    lora.save(model, tmp_path / "adapter", overwrite=True)
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]


def test_only_safetensors_and_plain_lora_adapters_are_read(tmp_path):
    model = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4))
    lora.save(model, tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"uses use_dora, which peftlab's LoRA does not implement: load it with peft"):
        lora.load(models.tiny_model("llama"), tmp_path / "dora")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin, a pickle, which peftlab does not read"):
        lora.load(models.tiny_model("llama"), tmp_path / "pickled")


def test_adapter_from_a_model_of_another_width_is_refused_naming_the_key(tmp_path):
    lora.save(lora.apply(models.tiny_model("llama"), LoRAConfig(r=4)), tmp_path)
    config = models.tiny_config("llama")
    config.hidden_size = 48
    wider = AutoModelForCausalLM.from_config(config)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(
        ValueError, match=re.escape(f"Shape mismatch for {key}: the adapter has (4, 32), the model (4, 48)")
    ):
        lora.load(wider, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# LoRA+
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_A", [False, True])
def test_loraplus_groups_are_those_of_peft(freeze_A):
    config = LoRAConfig(r=4, target_modules=TARGETS["bert"], modules_to_save=("classifier",), freeze_A=freeze_A)
    model = lora.apply(models.tiny_model("bert", task="classification"), config)
    ours = lora.loraplus_optimizer(model, lr=1e-3, ratio=16)
    reference = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)

    def rates(optimizer):
        return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}

    assert rates(ours) == rates(reference)
    b_matrices = {id(p) for name, p in model.named_parameters() if "lora_B" in name}
    assert {rate for key, rate in rates(ours).items() if key in b_matrices} == {16e-3}
    assert len(rates(ours)) == len([p for p in model.parameters() if p.requires_grad])


# ----------------------------------------------------------------------------------------------------------------
# LoRA-FA: peftlab's (A frozen, AdamW on B) and peft's optimizer (B's gradient preconditioned)
# ----------------------------------------------------------------------------------------------------------------
def lorafa_twins(orthonormal_A: bool):
    """peftlab's LoRA-FA and peft's LoRA on q_proj with the same A and B, each with its optimizer, after one step on
    the same batch. With ``orthonormal_A``, A = Q / s with orthonormal rows Q, so that s² A Aᵀ = I."""
    config = LoRAConfig(r=4, alpha=8, target_modules=("q_proj",), freeze_A=True)
    ours, theirs = peft_twin("llama", config)
    if orthonormal_A:
        q, _ = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(2)))
        with torch.no_grad():
            for model, prefix in ((ours, ""), (theirs, lora.PEFT_PREFIX)):
                dict(model.named_parameters())[prefix + "model.layers.0.self_attn.q_proj.lora_A.default.weight"].copy_(
                    q.T / config.scaling
                )
    optimizers = (torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3, eps=1e-6,
                                    weight_decay=0.0),
                  create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-3))  # fmt: skip
    ids = token_ids(ours)
    key = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    b_before = dict(ours.named_parameters())[key].detach().clone()
    grads = {}
    for model, optimizer, prefix in zip((ours, theirs), optimizers, ("", lora.PEFT_PREFIX), strict=True):
        (1e6 * model(input_ids=ids, labels=ids).loss).backward()  # gradients far above Adam's eps (1e-6 in peft's)
        grads[prefix] = dict(model.named_parameters())[prefix + key].grad.clone()
        optimizer.step()
    a = dict(ours.named_parameters())["model.layers.0.self_attn.q_proj.lora_A.default.weight"].detach()
    steps = [dict(m.named_parameters())[prefix + key].detach() - b_before
             for m, prefix in ((ours, ""), (theirs, lora.PEFT_PREFIX))]  # fmt: skip
    return steps, grads[""], a, config.scaling


def test_peft_lorafa_optimizer_preconditions_b_by_the_inverse_of_s2_a_at():
    """peft's create_lorafa_optimizer is not plain AdamW with A frozen: it feeds Adam g_B (s² A Aᵀ)⁻¹. Adam's first
    step is −lr · sign(g), so the step shows which gradient went in."""
    (ours, theirs), gradient, a, s = lorafa_twins(orthonormal_A=False)
    preconditioned = gradient @ torch.linalg.inv(s**2 * a @ a.T)
    torch.testing.assert_close(ours, -1e-3 * torch.sign(gradient), atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, -1e-3 * torch.sign(preconditioned), atol=1e-6, rtol=0)
    # At peft's init s² A Aᵀ is close to (s²/3) I (here the diagonal 1.0-1.5, off it ≤ 0.26), and Adam ignores a
    # scale: the two first steps differ in sign in only a few entries (3 of 128 here), by 2 lr where they do.
    assert 0 < (torch.sign(preconditioned) != torch.sign(gradient)).sum() < 16


def test_peft_lorafa_optimizer_is_peftlabs_lora_fa_where_s2_a_at_is_the_identity():
    (ours, theirs), _, a, s = lorafa_twins(orthonormal_A=True)
    torch.testing.assert_close(s**2 * a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: errors that say what to change
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"r": 0}, "at least 1"), ({"r": -2}, "at least 1"), ({"alpha": 0}, "alpha must be positive"),
     ({"alpha": -1.0}, "alpha must be positive"), ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
     ({"init": "pissa"}, "Unknown init"), ({"target_modules": "(q_proj"}, "not a valid one"),
     ({"target_modules": ()}, "module-name suffixes"), ({"modules_to_save": "classifier"}, "a tuple of module names"),
     ({"target_modules": ("all-linear", "q_proj")}, "pass it alone")],
)  # fmt: skip
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_a_target_that_matches_nothing_lists_close_names():
    message = r"matched target_modules=\('q_prj',\)\. Close names: .*q_proj.* Linear: q_proj, k_proj, v_proj, o_proj"
    with pytest.raises(ValueError, match=r"No module of LlamaForCausalLM " + message):
        lora.apply(models.tiny_model("llama"), LoRAConfig(target_modules=("q_prj",)))
    with pytest.raises(ValueError, match="Conv1D: c_attn, c_proj, c_fc"):
        lora.apply(models.tiny_model("gpt2"), LoRAConfig(target_modules=("q_proj",)))


def test_a_rank_larger_than_the_layer_is_refused_and_the_model_left_as_it_was():
    model = models.tiny_model("llama")  # k_proj: 32 → 16
    message = r"r=20 is larger than the layer model\.layers\.0\.self_attn\.k_proj \(32 → 16\)"
    with pytest.raises(ValueError, match=message):
        lora.apply(model, LoRAConfig(r=20, target_modules=("q_proj", "k_proj")))
    assert not lora.lora_layers(model) and count_parameters(model).trainable == count_parameters(model).total


def test_applying_twice_a_non_linear_target_and_a_wrong_config_are_refused():
    model = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4))
    with pytest.raises(ValueError, match=r"already has an adapter named 'default' \(lora\): choose another name"):
        lora.apply(model, LoRAConfig(r=4))
    with pytest.raises(ValueError, match=r"already carries lora; ia3 on top of it is not supported"):
        ia3.apply(model, ia3.IA3Config())
    with pytest.raises(ValueError, match="a LlamaAttention, but LoRA wraps linear layers"):
        lora.apply(models.tiny_model("llama"), LoRAConfig(target_modules=("self_attn",)))
    with pytest.raises(TypeError, match="takes a LoRAConfig"):
        lora.apply(models.tiny_model("llama"), {"r": 8})


def test_dropout_acts_on_the_lora_path_in_training_only():
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(16, 8))
    layer.add("default", LoRAConfig(r=4, alpha=8, dropout=0.5))
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 16)
    expected = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * 2.0
    torch.testing.assert_close(layer.eval()(x), expected)
    assert not torch.allclose(layer.train()(x), expected)


# ----------------------------------------------------------------------------------------------------------------
# Named adapters, and switching them off
# ----------------------------------------------------------------------------------------------------------------
def test_two_named_adapters_switch_train_and_save_apart_and_peft_loads_each(tmp_path):
    model = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4), adapter="first")
    model = lora.apply(model, LoRAConfig(r=2, target_modules=("q_proj",)), adapter="second")
    randomise(model)  # only "second" trains now: "first" keeps its B = 0 ...
    set_active(model, "first")
    randomise(model, seed=2)  # ... until it is the active one
    ids = token_ids(model)
    logits = {}
    for name in ("first", "second"):
        set_active(model, name)
        logits[name] = outputs(model, ids)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(f".{name}." in n for n in trained)
        lora.save(model, tmp_path / name, adapter=name)
    assert (logits["first"] - logits["second"]).abs().max() > 1e-3
    theirs = peft.PeftModel.from_pretrained(models.tiny_model("llama"), tmp_path / "first", adapter_name="first")
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ("first", "second"):
        theirs.set_adapter(name)
        torch.testing.assert_close(outputs(theirs, ids), logits[name], **TOLERANCE)
    both = lora.load(lora.load(models.tiny_model("llama"), tmp_path / "first", "first"), tmp_path / "second", "second")
    set_active(both, "first")
    torch.testing.assert_close(outputs(both, ids), logits["first"], atol=0, rtol=0)
    with pytest.raises(
        ValueError, match=r"No adapter named 'frist'\. Did you mean 'first'\? The model has: first, second"
    ):
        set_active(both, "frist")


def test_disabled_gives_the_base_models_logits_exactly_and_switches_back():
    base = models.tiny_model("llama")
    ids = token_ids(base)
    expected = outputs(base, ids)
    model = lora.apply(models.tiny_model("llama"), LoRAConfig(r=4))
    randomise(model)
    adapted = outputs(model, ids)
    with disabled(model):
        torch.testing.assert_close(outputs(model, ids), expected, atol=0, rtol=0)
    torch.testing.assert_close(outputs(model, ids), adapted, atol=0, rtol=0)
    lora.merge(model)
    with pytest.raises(RuntimeError, match="merged into the weights: unmerge first"), disabled(model):
        pass
    with pytest.raises(ValueError, match="has no adapters to switch off: apply a method first"), disabled(base):
        pass


def test_merging_lora_on_a_tied_lm_head_is_refused_before_it_changes_the_embeddings():
    model = lora.apply(models.tiny_model("llama"), LoRAConfig(r=2, target_modules=("lm_head",)))  # tied to embed
    randomise(model)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"lm_head's weight is tied to model.embed_tokens.weight .* Untie first"):
        lora.merge(model)
    assert (
        torch.equal(model.get_input_embeddings().weight, embeddings) and not lora.lora_layers(model)["lm_head"].merged
    )
