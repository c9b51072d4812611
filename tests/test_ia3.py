"""(IA)³, checked against peft's implementation: same vectors → same logits, same merged weights, same counts."""

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from peftlab import families, models, train
from peftlab.methods import ia3, layers
from peftlab.params import count_parameters, summary_by_kind

ARCHS = ("llama", "gpt2", "bert")


def batch_for(model, n=4, length=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, length), generator=generator)
    labels = torch.tensor([0, 1, 2, 0]) if model.config.model_type == "bert" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def tiny(arch, seed=0):
    return models.tiny_model(arch, task="classification" if arch == "bert" else None, seed=seed)


def outputs(model, batch):
    """Logits and the last hidden state (BERT's random classification head makes its logits tiny)."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def expected_count(arch, config) -> int:
    """The scaled dimensions of the default targets: k, v outputs (GPT-2: q, k, v) and the FFN down input."""
    layers, d = config.num_hidden_layers, config.hidden_size
    if arch == "llama":
        kv = config.num_key_value_heads * d // config.num_attention_heads
        return layers * (2 * kv + config.intermediate_size)
    if arch == "gpt2":
        return layers * (3 * d + (config.n_inner or 4 * d))  # c_attn's q, k, v; c_proj's input 4d
    return layers * (2 * d + config.intermediate_size)


def as_peft(targets):
    """peft takes a regular expression as a str and names as a list."""
    return targets if isinstance(targets, str) else list(targets)


def peft_twin(arch, config: ia3.IA3Config):
    """The same tiny model under peft, with our (resolved) targets."""
    model = tiny(arch)
    family = families.family_of(model)
    targets, feedforward = family.ia3_targets, family.ia3_feedforward
    targets = config.target_modules if config.target_modules is not None else targets
    feedforward = config.feedforward_modules if config.feedforward_modules is not None else feedforward
    peft_config = peft.IA3Config(
        target_modules=as_peft(targets),
        feedforward_modules=as_peft(feedforward),
        fan_in_fan_out=arch == "gpt2",
        task_type="SEQ_CLS" if arch == "bert" else None,
    )
    return peft.get_peft_model(model, peft_config)


def randomise_both(ours, theirs, seed=0):
    """Set every l to 1 + 0.5·N(0, 1), the same in both models; return how many vectors there were."""
    generator = torch.Generator().manual_seed(seed)
    theirs_modules = dict(theirs.base_model.model.named_modules())
    layers = [(name, m) for name, m in ours.named_modules() if isinstance(m, ia3.IA3Scaled)]
    with torch.no_grad():
        for name, layer in layers:
            values = 1 + 0.5 * torch.randn(layer.ia3_l["default"].shape, generator=generator)
            layer.ia3_l["default"].copy_(values)
            peft_l = theirs_modules[name].ia3_l["default"]
            assert peft_l.numel() == values.numel(), name
            peft_l.copy_(values.reshape(peft_l.shape))
    return len(layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_vectors_give_peft_logits_and_merged_weights(arch):
    config = ia3.IA3Config()
    ours, theirs = ia3.apply(tiny(arch), config), peft_twin(arch, config)
    vectors_per_block = 2 if arch == "gpt2" else 3  # GPT-2: fused c_attn and mlp.c_proj
    assert randomise_both(ours, theirs) == vectors_per_block * ours.config.num_hidden_layers
    batch = batch_for(ours)
    base_hidden = outputs(tiny(arch), batch)[1]
    ours_outputs = outputs(ours, batch)
    assert (ours_outputs[1] - base_hidden).abs().max() > 1e-2  # the vectors do something
    torch.testing.assert_close(ours_outputs, outputs(theirs, batch), atol=1e-5, rtol=1e-5)

    ia3.merge(ours)
    torch.testing.assert_close(outputs(ours, batch), ours_outputs, atol=1e-5, rtol=1e-5)
    merged = theirs.merge_and_unload()
    ours_weights = {n.replace(".base_layer.", "."): p for n, p in ours.named_parameters() if "ia3_" not in n}
    theirs_weights = dict(merged.named_parameters())
    assert ours_weights.keys() == theirs_weights.keys()
    for name, weight in theirs_weights.items():
        torch.testing.assert_close(ours_weights[name], weight, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_then_unmerge_restores_the_base(arch):
    base, model = tiny(arch), ia3.apply(tiny(arch), ia3.IA3Config())
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ia3.IA3Scaled):
                layer.ia3_l["default"].uniform_(0.5, 1.5)
    ia3.unmerge(ia3.merge(model))
    restored = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if "ia3_" not in n}
    for name, weight in base.named_parameters():
        torch.testing.assert_close(restored[name], weight, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_leaves_the_base_architecture_with_the_same_outputs(arch):
    model = ia3.apply(tiny(arch), ia3.IA3Config())
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ia3.IA3Scaled):
                layer.ia3_l["default"].uniform_(0.5, 1.5)
    batch = batch_for(model)
    scaled = outputs(model, batch)
    unloaded = ia3.merge_and_unload(model)
    assert not any(isinstance(module, layers.AdapterLayer) for module in unloaded.modules())
    assert layers.record(unloaded) is None and not any("ia3_" in name for name, _ in unloaded.named_parameters())
    assert set(unloaded.state_dict()) == set(tiny(arch).state_dict())  # the base model's own names and modules
    for got, want in zip(outputs(unloaded, batch), scaled, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"has no .* layers: apply"):
        ia3.merge_and_unload(unloaded)


def test_unload_refuses_an_adapter_that_is_not_merged_before_anything_changes():
    model = ia3.apply(tiny("llama"), ia3.IA3Config())
    ia3.apply(model, ia3.IA3Config(), adapter="other")  # the active one is now "other"; "default" stays unmerged
    ia3.merge(model)
    with pytest.raises(RuntimeError, match=r"adapter\(s\) \['default'\] that are not merged"):
        layers.unload(model, ia3.IA3Scaled)
    assert layers.adapter_layers(model, ia3.IA3Scaled) and layers.record(model) is not None


def test_merge_and_unload_refuses_an_adapter_merging_would_leave_out_before_anything_is_merged():
    model = ia3.apply(tiny("llama"), ia3.IA3Config())
    ia3.apply(model, ia3.IA3Config(), adapter="other")  # merging would fold "other" in and drop "default"
    with pytest.raises(RuntimeError, match=r"adapter\(s\) \['default'\] that are not merged"):
        ia3.merge_and_unload(model)
    found = layers.adapter_layers(model, ia3.IA3Scaled)
    assert found and not any(layer.merged for layer in found.values())  # nothing merged


def test_merge_scales_rows_columns_and_biases_as_the_formulas_say():
    """Output scaling: W' = diag(l) W, b' = l ⊙ b. Input scaling: W' = W diag(l), b' = b. Conv1D stores Wᵀ."""
    torch.manual_seed(0)
    for base in (torch.nn.Linear(3, 4), Conv1D(4, 3)):  # both map 3 → 4
        for scale_input in (False, True):
            layer = ia3.IA3Scaled(base, scale_input=scale_input)
            layer.add("default")
            with torch.no_grad():
                layer.ia3_l["default"].uniform_(0.5, 1.5)
            x = torch.randn(5, 3)
            w = base.weight.detach().clone()
            w = w if isinstance(base, torch.nn.Linear) else w.T  # as [out, in]
            b = base.bias.detach().clone()
            l_in, l_out = (layer.ia3_l["default"], 1) if scale_input else (1, layer.ia3_l["default"])
            expected = (x * l_in) @ w.T * l_out + b * l_out
            torch.testing.assert_close(layer(x), expected)
            ia3.merge(layer)
            torch.testing.assert_close(layer(x), expected)
            ia3.unmerge(layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_is_the_sum_of_scaled_dimensions_and_peft_agrees(arch):
    config = ia3.IA3Config()
    model = ia3.apply(tiny(arch), config)
    expected = expected_count(arch, model.config)
    head = 32 * 3 + 3 if arch == "bert" else 0  # a classifier's new head trains (as peft's SEQ_CLS)
    assert count_parameters(model).trainable == expected + head
    assert summary_by_kind(model).loc["ia3", "trainable"] == expected  # the names contain "ia3_"
    assert peft_twin(arch, config).get_nb_trainable_parameters()[0] == expected + head


def test_peft_bert_default_also_scales_the_attention_output_input():
    """peft's BERT default 'output.dense' matches attention.output.dense too: d more per block (see ia3's docstring).
    Given peft's names, we match what peft matches."""
    config = ia3.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    model = ia3.apply(tiny("bert"), config)
    d = model.config.hidden_size
    assert count_parameters(model).trainable == expected_count("bert", model.config) + 2 * d + (3 * d + 3)  # + head
    assert model.bert.encoder.layer[0].attention.output.dense.scale_input
    theirs = peft_twin("bert", config)
    assert theirs.get_nb_trainable_parameters()[0] == count_parameters(model).trainable
    randomise_both(model, theirs)
    batch = batch_for(model)
    torch.testing.assert_close(outputs(model, batch), outputs(theirs, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("llama-2-7b", 32 * (4096 + 4096 + 11008)), ("smollm2-135m", 30 * (192 + 192 + 1536)),
     ("bert-base", 12 * (768 + 768 + 3072)), ("gpt2", 12 * (3 * 768 + 3072))],
)  # fmt: skip
def test_real_architectures_count_on_the_meta_device(name, expected):
    model = ia3.apply(models.meta_model(name), ia3.IA3Config())
    assert count_parameters(model).trainable == expected  # llama-2-7b: 614,400, as peft prints


def test_loss_falls_and_the_base_stays_bit_identical():
    torch.manual_seed(0)
    model = tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ia3.apply(model, ia3.IA3Config())
    config = train.TrainConfig(max_steps=20, learning_rate=1e-1, schedule="constant")
    history = train.train(model, [batch_for(model)], config, progress=False)
    # A frozen random-init head (std 0.02) caps how far the loss of a tiny model can fall.
    assert history.losses[-1] < history.losses[0] - 0.05
    for name, param in model.named_parameters():
        if "ia3_" in name:
            assert not torch.equal(param, torch.ones_like(param)), name
        else:
            assert torch.equal(param, before[name.replace(".base_layer.", ".")]), name


def test_targets_matching_nothing_list_close_names():
    with pytest.raises(ValueError, match=r"matched target_modules='k_prj'\. Close names: k_proj.* Linear: q_proj"):
        ia3.apply(tiny("llama"), ia3.IA3Config(target_modules=["k_prj", "down_proj"], feedforward_modules=[]))
    with pytest.raises(
        ValueError, match=r"No module of BertForSequenceClassification matched target_modules='\.\*\\\\\.nothing'"
    ):
        ia3.apply(tiny("bert"), ia3.IA3Config(target_modules=r".*\.nothing", feedforward_modules=[]))


def test_feedforward_modules_must_be_targets():
    with pytest.raises(ValueError, match=r"feedforward_modules \['down_proj'\] are not among target_modules"):
        ia3.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match=r"matches 'model\.layers\.0\.mlp\.down_proj', which target_modules"):
        ia3.apply(tiny("llama"), ia3.IA3Config(target_modules=["k_proj", "v_proj"]))  # the default feedforward
    with pytest.raises(ValueError, match=r"feedforward_modules 'down_prj' matches none of the targets.*'down_proj'"):
        ia3.apply(tiny("llama"), ia3.IA3Config(feedforward_modules=["down_prj"]))  # a typo: down_proj scaled out
    with pytest.raises(ValueError, match=r"feedforward_modules '\.\*nothing' matches none of the targets"):
        ia3.apply(tiny("llama"), ia3.IA3Config(feedforward_modules=r".*nothing"))
    model = ia3.apply(tiny("llama"), ia3.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=()))
    assert count_parameters(model).trainable == 2 * 2 * 16


def test_applying_and_merging_twice_are_refused():
    model = ia3.apply(tiny("gpt2"), ia3.IA3Config())
    with pytest.raises(ValueError, match=r"already has an adapter named 'default' \(ia3\): choose another name"):
        ia3.apply(model, ia3.IA3Config())
    ia3.merge(model)
    assert count_parameters(model).trainable == 0  # l is in the weights now
    with pytest.raises(RuntimeError, match="already merged: merging twice would apply it twice"):
        ia3.merge(model)
    ia3.unmerge(model)
    assert count_parameters(model).trainable == expected_count("gpt2", model.config)
    with pytest.raises(RuntimeError, match="not merged: there is nothing to unmerge"):
        ia3.unmerge(model)
    with pytest.raises(ValueError, match=r"has no \(IA\)³ layers: apply \(IA\)³ first"):
        ia3.merge(tiny("gpt2"))


def test_other_bad_inputs():
    with pytest.raises(TypeError, match=r"LlamaMLP; .* target the projections inside it"):
        ia3.apply(tiny("llama"), ia3.IA3Config(target_modules=["mlp"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="target_modules is empty"):
        ia3.IA3Config(target_modules=[])
    with pytest.raises(TypeError, match="takes an IA3Config"):
        ia3.apply(tiny("llama"), object())
    with pytest.raises(ValueError, match="pass target_modules and feedforward_modules"):
        ia3.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), ia3.IA3Config())
