"""AdapterFusion and AdapterDrop. No reference runs on transformers 5 (AdapterHub's `adapters` pins 4.57), so the
tests hold the fusion to its equations: a one-hot attention with W_V = I is the adapter it picks, counts are the
closed form 3d² + 3d per fusion layer, dropped blocks compute what the base computes."""

import copy

import pytest
import torch

from peftlab import models, train
from peftlab.methods import adapter, disabled, fusion, set_active
from peftlab.params import count_parameters

NAMES = ("tweets", "headlines", "quality")


def tiny(seed=0):
    return models.tiny_model("bert", task="classification", seed=seed)


def batch_for(model, n=4, length=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 0])}


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def randomise_adapters(model, seed=1):
    """Trained-looking adapters: every W_up, b_up and b_down random (W_up = 0 would make every adapter h)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def with_adapters(names=NAMES, placement=("ffn",), seed=0, **kwargs):
    model = tiny(seed)
    for name in names:
        adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement=placement, train_norms=False, **kwargs),
                      adapter=name)  # fmt: skip
    randomise_adapters(model)
    return model


def test_the_fusion_layer_computes_its_equations():
    torch.manual_seed(0)
    layer = fusion.Fusion(8, init_scale=0.5)
    for linear in (layer.query, layer.key, layer.value):
        torch.nn.init.normal_(linear.bias)
    torch.nn.init.normal_(layer.value.weight)
    h, z = torch.randn(2, 5, 8), torch.randn(2, 5, 3, 8)
    q = h @ layer.query.weight.T + layer.query.bias
    k = z @ layer.key.weight.T + layer.key.bias
    s = torch.softmax(torch.einsum("btd,btnd->btn", q, k), dim=-1)
    values = z @ layer.value.weight.T + layer.value.bias
    o, weights = layer(h, z)
    torch.testing.assert_close(weights, s)
    torch.testing.assert_close(o, h + (s.unsqueeze(-1) * values).sum(-2))
    assert fusion.fusion_parameter_count(8) == sum(p.numel() for p in layer.parameters()) == 3 * 64 + 3 * 8


def test_values_start_as_the_identity_and_the_attention_near_uniform():
    torch.manual_seed(0)
    layer = fusion.Fusion(16)
    assert torch.equal(layer.value.weight, torch.eye(16)) and not layer.value.bias.any()
    assert 0 < layer.query.weight.std() < 0.03 and 0 < layer.key.weight.std() < 0.03
    _, s = layer(torch.randn(4, 16), torch.randn(4, 3, 16))
    torch.testing.assert_close(s, torch.full_like(s, 1 / 3), atol=0.05, rtol=0)  # scores of order 0.1


@pytest.mark.parametrize("picked", range(3))
def test_a_one_hot_attention_with_identity_values_is_that_adapter_alone(picked):
    """W_Q = 0 and b_Q = λv, W_K = I: s_n ∝ exp(λ v·z_n). Adapter ``picked`` gets b_up = v; every other W_up column
    and b_up is made orthogonal to v, so v·z_n = 0 for them and |v|² for it: with λ large, s is one-hot in float32."""
    model = with_adapters()
    d = model.config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    projector = torch.eye(d) - torch.outer(v, v) / v.dot(v)
    wrapped = [m for m in model.modules() if isinstance(m, adapter.AdapterWrapped)]
    with torch.no_grad():
        for layer in wrapped:
            for index, name in enumerate(NAMES):
                up = layer.adapter[name].up
                up.weight.copy_(projector @ up.weight)
                up.bias.copy_(v if index == picked else projector @ up.bias)
    alone = copy.deepcopy(model)
    set_active(alone, NAMES[picked])
    fusion.apply(model, fusion.FusionConfig(adapters=NAMES))
    with torch.no_grad():
        for layer in fusion.fusion_layers(model).values():
            fused = layer.adapter_fusion["fusion"]
            fused.query.weight.zero_()
            fused.query.bias.copy_(1e4 * v / v.dot(v))
            fused.key.weight.copy_(torch.eye(d))
    model.classifier.load_state_dict(alone.classifier.state_dict())
    batch = batch_for(model)
    torch.testing.assert_close(logits(model, batch), logits(alone, batch), atol=1e-5, rtol=0)
    weights = fusion.fusion_weights(model, [batch])
    for path in weights.by_class:
        expected = torch.zeros(3, 3)
        expected[:, picked] = 1
        torch.testing.assert_close(weights.by_class[path], expected)


@pytest.mark.parametrize("placement", [("ffn",), ("attention", "ffn")])
def test_only_the_fusion_and_the_head_train_and_the_count_is_the_closed_form(placement):
    model = with_adapters(placement=placement)
    total_before = count_parameters(model).total
    fusion.apply(model, fusion.FusionConfig(adapters=NAMES))
    d, blocks = model.config.hidden_size, model.config.num_hidden_layers
    fused = blocks * len(placement) * fusion.fusion_parameter_count(d)  # one fusion layer per adapter position
    head = d * 3 + 3
    assert count_parameters(model).trainable == fused + head
    assert count_parameters(model).total == total_before + fused
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".adapter_fusion.fusion." in n or n.startswith("classifier.") for n in trained)


def test_minilm_on_the_meta_device_has_3d2_plus_3d_per_block():
    """MiniLM-L6, d = 384, adapters after the FFN only: 6 × (3 · 384² + 3 · 384) = 2,661,120 fusion parameters."""
    model = models.meta_model("minilm-l6")
    for name in NAMES:
        adapter.apply(model, adapter.AdapterConfig(bottleneck=48, placement="ffn", train_norms=False), adapter=name)
    fusion.apply(model, fusion.FusionConfig(adapters=NAMES, train_head=False))
    assert count_parameters(model).trainable == 6 * fusion.fusion_parameter_count(384) == 2_661_120


def test_switching_between_the_fusion_one_adapter_and_none():
    model = with_adapters()
    batch = batch_for(model)
    single = {}
    for name in NAMES:
        set_active(model, name)
        single[name] = logits(model, batch)
    base = logits(tiny(), batch)
    fusion.apply(model, fusion.FusionConfig(adapters=NAMES, train_head=False))
    fused = logits(model, batch)
    with disabled(model):
        torch.testing.assert_close(logits(model, batch), base)
    set_active(model, "headlines")
    torch.testing.assert_close(logits(model, batch), single["headlines"])
    set_active(model, "fusion")
    torch.testing.assert_close(logits(model, batch), fused)
    assert all((fused - single[name]).abs().max() > 1e-3 for name in NAMES)
    with pytest.raises(ValueError, match="activate it alone"):
        set_active(model, ["fusion", "tweets"])


def test_training_moves_the_fusion_and_the_head_only():
    torch.manual_seed(0)
    model = with_adapters()
    fusion.apply(model, fusion.FusionConfig(adapters=NAMES))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = train.TrainConfig(max_steps=20, learning_rate=3e-2, schedule="constant")
    history = train.train(model, [batch_for(model)], config, progress=False)
    assert history.losses[-1] < history.losses[0] - 0.05
    for name, param in model.named_parameters():
        moves = ".adapter_fusion." in name or name.startswith("classifier.")
        assert torch.equal(param, before[name]) != moves, name


def test_copy_adapter_brings_the_adapter_and_its_logits():
    source = with_adapters(names=("tweets",), seed=0)
    model = fusion.copy_adapter(source, tiny(seed=0), "tweets")
    model.classifier.load_state_dict(source.classifier.state_dict())
    batch = batch_for(model)
    torch.testing.assert_close(logits(model, batch), logits(source, batch), atol=0, rtol=0)
    assert model.peftlab.configs["tweets"] == source.peftlab.configs["tweets"]


def test_adapters_from_another_base_or_with_their_norms_do_not_travel():
    source = with_adapters(names=("tweets",), seed=0)
    with pytest.raises(ValueError, match=r"base differs from this model's \(.*\): an adapter fits only the base"):
        fusion.copy_adapter(source, tiny(seed=1), "tweets")
    with pytest.raises(ValueError, match=r"No adapter named 'tweet' on the source model\. Did you mean 'tweets'"):
        fusion.copy_adapter(source, tiny(seed=0), "tweet")
    normed = tiny()
    adapter.apply(normed, adapter.AdapterConfig(bottleneck=4, placement="ffn"), adapter="tweets")
    with pytest.raises(ValueError, match="trained with train_norms=True: the LayerNorms it trained"):
        fusion.copy_adapter(normed, tiny(), "tweets")


def dropped_outputs(model, batch):
    """The hidden state after each block."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    return out.hidden_states[1:]


@pytest.mark.parametrize("fused", [False, True])
def test_drop_leaves_the_first_n_blocks_computing_the_base(fused):
    base = tiny()
    model = with_adapters(placement=("attention", "ffn"))
    if fused:
        fusion.apply(model, fusion.FusionConfig(adapters=NAMES))
    d = model.config.hidden_size
    trainable_before = count_parameters(model).trainable
    fusion.drop(model, 1)
    batch = batch_for(model)
    ours, theirs = dropped_outputs(model, batch), dropped_outputs(base, batch)
    torch.testing.assert_close(ours[0], theirs[0], atol=0, rtol=0)
    assert (ours[1] - theirs[1]).abs().max() > 1e-3  # block 1 keeps its adapters
    # what trains in one block's two positions: the fusion layers, or else the active adapter ("quality", the last)
    per_block = 2 * (fusion.fusion_parameter_count(d) if fused else adapter.adapter_parameter_count(d, 4))
    assert count_parameters(model).trainable == trainable_before - per_block
    assert all(config.layers == (1,) for name, config in model.peftlab.configs.items() if name in NAMES)
    assert not any(isinstance(m, adapter.AdapterWrapped | fusion.FusedAdapters)
                   for m in model.bert.encoder.layer[0].modules())  # fmt: skip


def test_prune_removes_the_least_used_adapter_and_equals_a_fusion_of_the_rest():
    model = with_adapters()
    fusion.apply(model, fusion.FusionConfig(adapters=NAMES, init_scale=0.5))
    batch = batch_for(model)
    weights = fusion.fusion_weights(model, [batch])
    table = weights.table()
    assert list(table.columns) == list(NAMES) and len(table) == 2 * 3  # 2 blocks × 3 classes
    assert (table.sum(axis=1) - 1).abs().max() < 1e-6  # the weights of each class sum to one
    least = {path: NAMES[int(weights.mean(path).argmin())] for path in weights.by_class}
    pruned = fusion.prune(model, weights)
    assert pruned == least
    # reference: every layer fuses the two left, with the same matrices (a fusion's matrices serve any N)
    reference = copy.deepcopy(model)
    for path, layer in fusion.fusion_layers(reference).items():
        assert layer.fused["fusion"] == [n for n in NAMES if n != least[path]]
    pruned_logits = logits(model, batch)
    by_hand = {}
    for path, layer in fusion.fusion_layers(reference).items():
        wrapped, fused = layer.base_layer, layer.adapter_fusion["fusion"]
        by_hand[path] = (wrapped, fused, [n for n in NAMES if n != least[path]])

    def forward(wrapped, fused, kept):
        def run(x):
            h = wrapped.base_layer(x)
            return fused(h, torch.stack([fusion.adapter_output(wrapped.adapter[n], h) for n in kept], dim=-2))[0]

        return run

    for path, (wrapped, fused, kept) in by_hand.items():
        reference.get_submodule(path).forward = forward(wrapped, fused, kept)
    torch.testing.assert_close(pruned_logits, logits(reference, batch), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="measure them again"):
        fusion.prune(model, weights)


def test_prune_across_layers_removes_the_same_adapter_everywhere():
    model = with_adapters()
    fusion.apply(model, fusion.FusionConfig(adapters=NAMES, init_scale=0.5))
    weights = fusion.fusion_weights(model, [batch_for(model)])
    overall = torch.stack([weights.mean(path) for path in weights.by_class]).mean(0)
    pruned = fusion.prune(model, weights, per_layer=False)
    assert set(pruned.values()) == {NAMES[int(overall.argmin())]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapters": ("tweets",)}, "at least two adapters, got 1 \\(tweets\\)"),
        ({"adapters": "tweets"}, "at least two adapters, got 1"),
        ({"adapters": ("tweets", "tweets")}, "names one twice"),
        ({"adapters": ("tweets", "not a name")}, "must be a Python identifier"),
        ({"adapters": ("a", "b"), "init_scale": 0.0}, "init_scale must be positive"),
    ],
)
def test_bad_configs_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fusion.FusionConfig(**kwargs)


def test_bad_fusions_say_what_to_change():
    with pytest.raises(ValueError, match="works on bottleneck adapters, but BertForSequenceClassification has no"):
        fusion.apply(tiny(), fusion.FusionConfig(adapters=NAMES))
    model = with_adapters()
    with pytest.raises(ValueError, match=r"No adapter named 'headline' on this model\. Did you mean 'headlines'"):
        fusion.apply(model, fusion.FusionConfig(adapters=("tweets", "headline")))
    with pytest.raises(TypeError, match="takes a FusionConfig"):
        fusion.apply(model, adapter.AdapterConfig())
    adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement="attention", train_norms=False), adapter="odd")
    with pytest.raises(ValueError, match=r"same places: 'tweets' is at \('ffn',\) in blocks \[0, 1\], 'odd' at "):
        fusion.apply(model, fusion.FusionConfig(adapters=("tweets", "odd")))
    adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement="ffn", layers=(1,), train_norms=False),
                  adapter="upper")  # fmt: skip
    with pytest.raises(ValueError, match=r"in blocks \[0, 1\], 'upper' at \('ffn',\) in blocks \[1\]"):
        fusion.apply(model, fusion.FusionConfig(adapters=("tweets", "upper")))
    fusion.apply(model, fusion.FusionConfig(adapters=("tweets", "headlines")))
    with pytest.raises(ValueError, match="already has an adapter named 'fusion'"):
        fusion.apply(model, fusion.FusionConfig(adapters=("tweets", "quality")))
    with pytest.raises(ValueError, match="'fusion' is a fusion, not an adapter"):
        fusion.apply(model, fusion.FusionConfig(adapters=("tweets", "fusion")), adapter="again")


def test_adapters_after_the_norm_are_refused():
    model = with_adapters(names=("tweets", "headlines"), placement=adapter.PFEIFFER)
    with pytest.raises(ValueError, match=r"AdapterFusion here mixes adapters after a projection"):
        fusion.apply(model, fusion.FusionConfig(adapters=("tweets", "headlines")))


def test_adapters_of_different_bottlenecks_fuse():
    model = tiny()
    for name, m in (("narrow", 2), ("wide", 8)):
        adapter.apply(model, adapter.AdapterConfig(bottleneck=m, placement="ffn", train_norms=False), adapter=name)
    fusion.apply(model, fusion.FusionConfig(adapters=("narrow", "wide")))
    assert logits(model, batch_for(model)).shape == (4, 3)


def test_bad_drops_say_what_to_change():
    model = with_adapters()
    with pytest.raises(ValueError, match=r"n must be a number of blocks from 0 to 2 \(.* has 2 blocks\), got 3"):
        fusion.drop(model, 3)
    with pytest.raises(ValueError, match="got -1"):
        fusion.drop(model, -1)
    with pytest.raises(ValueError, match=r"leaves no adapter \(they are in blocks \[0, 1\]\): drop at most 1"):
        fusion.drop(model, 2)
    with pytest.raises(ValueError, match="works on bottleneck adapters"):
        fusion.drop(tiny(), 1)


@pytest.mark.parametrize("dropped", [0, 2, 5])
def test_the_registry_entry_counts_the_fusion_of_the_blocks_left(dropped):
    """By name (the explorers, the estimator): L' (3d² + 3d) trainable on MiniLM, L' = 6 − dropped blocks; the
    adapters are there and frozen, W_up = 0 (untrained stage-1 adapters), the first blocks hold none."""
    from peftlab.methods import apply_method

    model = models.meta_model("minilm-l6")
    apply_method(model, "adapter-fusion", fusion.AdapterFusionConfig(num_adapters=3, bottleneck=48, dropped=dropped))
    assert count_parameters(model).trainable == (6 - dropped) * fusion.fusion_parameter_count(384)
    adapters = [name for name, _ in model.named_parameters() if ".adapter." in name]
    assert adapters and all(int(name.split("layer.")[1].split(".")[0]) >= dropped for name in adapters)
    assert len(fusion.fusion_layers(model)) == 6 - dropped


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_adapters": 1}, "num_adapters must be a whole number of at least 2"),
    ({"bottleneck": 0}, "bottleneck must be a whole number of at least 1"),
    ({"dropped": -1}, "dropped must be a whole number of at least 0"),
])  # fmt: skip
def test_the_registry_config_refuses_what_cannot_fuse(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fusion.AdapterFusionConfig(**kwargs)


def test_dropping_every_block_is_refused_before_the_model_changes():
    model = tiny()
    before = {name for name, _ in model.named_modules()}
    blocks = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"has {blocks} blocks, so drop at most {blocks - 1}"):
        fusion.apply_adapter_fusion(model, fusion.AdapterFusionConfig(dropped=blocks))
    assert {name for name, _ in model.named_modules()} == before
