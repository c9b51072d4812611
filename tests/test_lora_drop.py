"""LoRA-drop, checked against its definitions: importance is the normalised mean ‖ΔW x‖² over tokens, the kept
layers are the fewest that reach the threshold, the dropped layers share literally the same A and B per shape, the
trainable count is the closed form, and the shared model trains. peft has no LoRA-drop to compare with."""

import pytest
import torch

from peftlab import models, train
from peftlab.methods import lora, lora_drop
from peftlab.methods.lora import LoRAConfig, lora_parameter_count
from peftlab.methods.lora_drop import LoRADropConfig
from peftlab.params import count_parameters

ALL_LINEAR = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
#: The tiny Llama's linear layers per block, (d_in, d_out): 7 per block, 2 blocks, 4 shapes.
SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
          "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}  # fmt: skip


def token_batches(model, n=4, length=12, count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, model.config.vocab_size, (n, length), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def trained_lora(config=ALL_LINEAR, steps=10):
    """Step 1 of LoRA-drop: a short LoRA training on the sample."""
    model = lora.apply(models.tiny_model("llama"), config)
    train_config = train.TrainConfig(max_steps=steps, learning_rate=1e-2, schedule="constant")
    train.train(model, token_batches(model), train_config, progress=False)
    return model


@torch.no_grad()
def mean_squared_outputs_by_hand(model, batches):
    """g_i = mean over tokens of ‖γ B_i A_i x‖², from the inputs of every LoRA layer captured on the batches."""
    inputs = {name: [] for name in lora.lora_layers(model)}
    handles = [layer.register_forward_hook(lambda module, args, output, name=name: inputs[name].append(args[0]))
               for name, layer in lora.lora_layers(model).items()]  # fmt: skip
    for batch in batches:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    result = {}
    for name, layer in lora.lora_layers(model).items():
        x = torch.cat([i.reshape(-1, layer.in_features) for i in inputs[name]])
        result[name] = (
            (layer.scaling["default"] * x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T)
            .pow(2)
            .sum(-1)
            .mean()
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# Importance and selection
# ----------------------------------------------------------------------------------------------------------------
def test_importance_is_the_normalised_mean_squared_lora_output():
    model = trained_lora()
    batches = token_batches(model)
    importance = lora_drop.layer_importance(model, batches)
    assert len(importance) == 14 and sum(importance.values()) == pytest.approx(1.0)
    by_hand = mean_squared_outputs_by_hand(model, batches)
    total = sum(by_hand.values())
    for name, value in importance.items():
        assert value == pytest.approx((by_hand[name] / total).item(), rel=1e-4), name
    assert lora_drop.layer_importance(model, batches, max_batches=1) != importance  # only the first batch


def test_a_layer_whose_B_is_scaled_up_ranks_higher():
    model = trained_lora()
    batches = token_batches(model)
    before = lora_drop.layer_importance(model, batches)
    lowest = min(before, key=before.get)
    with torch.no_grad():
        lora.lora_layers(model)[lowest].lora_B["default"].weight.mul_(100)  # its output 100 times larger: g × 10⁴
    after = lora_drop.layer_importance(model, batches)
    assert max(after, key=after.get) == lowest and after[lowest] > 0.5 > before[lowest]
    assert sum(after.values()) == pytest.approx(1.0)


def test_padding_tokens_do_not_count():
    """Right padding in a causal model leaves the real tokens' inputs unchanged: the padded batch must score as
    the batch of the real tokens alone."""
    model = trained_lora()
    (batch,) = token_batches(model, count=1)
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][:, 8:] = 0
    real = {key: value[:, :8] for key, value in batch.items()}
    for name, value in lora_drop.layer_importance(model, [padded]).items():
        assert value == pytest.approx(lora_drop.layer_importance(model, [real])[name], rel=1e-4)


def test_kept_layers_are_the_fewest_that_reach_the_threshold():
    importance = {"a": 0.05, "b": 0.4, "c": 0.3, "d": 0.15, "e": 0.1}
    assert lora_drop.kept_layers(importance, 0.9) == ["b", "c", "d", "e"]  # 0.95; the first three make 0.85 only
    assert lora_drop.kept_layers(importance, 0.85) == ["b", "c", "d"]  # exactly reached
    assert lora_drop.kept_layers(importance, 0.1) == ["b"]
    assert lora_drop.kept_layers(importance, 1.0) == ["b", "c", "d", "e", "a"]
    assert lora_drop.kept_layers({**importance, "z": 0.0}, 1.0) == ["b", "c", "d", "e", "a"]  # not the zero one
    # On a trained model: the kept ones reach T, and without the last of them they would not.
    importance = lora_drop.layer_importance(trained_lora(), token_batches(models.tiny_model("llama")))
    kept = lora_drop.kept_layers(importance, 0.9)
    assert sum(importance[n] for n in kept) >= 0.9 > sum(importance[n] for n in kept[:-1])
    assert min(importance[n] for n in kept) >= max(importance[n] for n in importance if n not in kept)


# ----------------------------------------------------------------------------------------------------------------
# The shared model
# ----------------------------------------------------------------------------------------------------------------
def dropped_model(threshold=0.9):
    importance = lora_drop.layer_importance(trained_lora(), token_batches(models.tiny_model("llama")))
    model = lora_drop.apply(models.tiny_model("llama"), LoRADropConfig(importance, threshold, lora=ALL_LINEAR))
    return model, importance


def test_dropped_layers_share_the_same_parameters_one_pair_per_shape():
    model, _ = dropped_model()
    (kept, shared), layers = lora_drop.choice(model), lora.lora_layers(model)
    assert set(kept) | {n for names in shared.values() for n in names} == set(layers)
    for shape, names in shared.items():
        owner = layers[names[0]]
        for name in names:
            assert (layers[name].in_features, layers[name].out_features) == shape
            for part in ("lora_A", "lora_B"):
                mine, theirs = getattr(layers[name], part)["default"].weight, getattr(owner, part)["default"].weight
                assert mine is theirs and mine.data_ptr() == theirs.data_ptr()
    own = {id(layers[name].lora_A["default"].weight) for name in kept}
    assert len(own) == len(kept) and not own & {
        id(layers[names[0]].lora_A["default"].weight) for names in shared.values()
    }


def test_trainable_count_is_kept_layers_plus_one_lora_per_shape_group():
    model, _ = dropped_model()
    r, (kept, shared) = ALL_LINEAR.r, lora_drop.choice(model)
    layers = lora.lora_layers(model)
    expected = sum(lora_parameter_count(layers[n].in_features, layers[n].out_features, r) for n in kept) + sum(
        lora_parameter_count(d_in, d_out, r) for d_in, d_out in shared
    )
    plain = 2 * sum(lora_parameter_count(d_in, d_out, r) for d_in, d_out in SHAPES.values())
    counted = lora_drop.count_shared_parameters(model)
    assert counted.unique == count_parameters(model).trainable == expected  # parameters() counts a shared one once
    assert counted.per_layer == plain == 4_096  # as if every layer had its own: plain LoRA's count
    assert expected < plain
    print(f"kept {len(kept)} of 14 layers, {len(shared)} shared groups: {expected:,} trainable vs {plain:,} for LoRA")


def test_on_tiny_llama_the_dropped_model_trains_with_fewer_parameters_than_lora():
    model, _ = dropped_model(threshold=0.5)
    plain = lora.apply(models.tiny_model("llama"), ALL_LINEAR)
    ours, theirs = count_parameters(model).trainable, count_parameters(plain).trainable
    print(f"LoRA-drop (T = 0.5, kept {len(lora_drop.choice(model).kept)} of 14): {ours:,} trainable; LoRA: {theirs:,}")
    assert ours < theirs == 4_096
    shared_name = next(names for names in lora_drop.choice(model).shared.values() if len(names) > 1)
    shared_weight = lora.lora_layers(model)[shared_name[1]].lora_B["default"].weight
    config = train.TrainConfig(max_steps=40, learning_rate=1e-2, schedule="constant")
    history = train.train(model, token_batches(model, count=1), config, progress=False)
    assert history.trainable_parameters == ours
    assert history.losses[-1] < history.losses[0] - 0.3  # 4.88 → 4.38
    assert shared_weight.any()  # B moved from 0, and is still the one tensor of every layer of the group
    assert lora.lora_layers(model)[shared_name[0]].lora_B["default"].weight is shared_weight


# ----------------------------------------------------------------------------------------------------------------
# Bad input: errors that say what to change
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0, -0.1, 1.01, 2])
def test_thresholds_outside_zero_one_are_refused(threshold):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        LoRADropConfig("uniform", threshold)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        lora_drop.kept_layers({"a": 1.0}, threshold)


def test_importance_must_name_exactly_the_model_lora_layers():
    importance = lora_drop.layer_importance(trained_lora(), token_batches(models.tiny_model("llama")))
    wrong = {**importance, "model.layers.7.self_attn.q_proj": 0.0}
    with pytest.raises(ValueError, match=r"not in the model: model\.layers\.7\.self_attn\.q_proj; no importance for: "
                                         r"none\. Measure it with layer_importance"):  # fmt: skip
        lora_drop.apply(models.tiny_model("llama"), LoRADropConfig(wrong, lora=ALL_LINEAR))
    only_q = {name: value for name, value in importance.items() if name.endswith("q_proj")}
    with pytest.raises(ValueError, match=r"not in the model: none; no importance for: .*k_proj"):
        lora_drop.apply(models.tiny_model("llama"), LoRADropConfig(only_q, lora=ALL_LINEAR))
    model = models.tiny_model("llama")
    with pytest.raises(TypeError, match="takes a LoRADropConfig"):
        lora_drop.apply(model, 0.9)
    with pytest.raises(ValueError, match="needs the layers' importance: measure it with layer_importance"):
        LoRADropConfig()
    assert not lora.lora_layers(model)  # refused before anything changed
    counted = lora_drop.apply(models.tiny_model("llama"), LoRADropConfig("uniform", 0.5, lora=ALL_LINEAR))
    assert (
        len(lora_drop.choice(counted).kept) == 7 and counted.peftlab.method == "lora-drop"
    )  # uniform importance: half of the 14 layers, for counting


def test_importance_of_an_untrained_or_plain_model_is_refused():
    untrained = lora.apply(models.tiny_model("llama"), ALL_LINEAR)
    with pytest.raises(ValueError, match="B is still at its zero init"):
        lora_drop.layer_importance(untrained, token_batches(untrained))
    with pytest.raises(ValueError, match="has no LoRA layers"):
        lora_drop.layer_importance(models.tiny_model("llama"), [])
