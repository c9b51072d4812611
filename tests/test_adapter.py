"""Houlsby and Pfeiffer adapters. peft has none, so counts are checked against the closed form 2dm + d + m (the logits
against AdapterHub's adapters 1.3.0: make reference-adapters, outside this suite)."""

import pytest
import torch

from peftlab import models, train
from peftlab.methods import adapter
from peftlab.params import count_parameters, summary_by_kind

ARCHS = ("llama", "gpt2", "bert")
#: Parameters of the normalisation layers inside one block, per family, for hidden size d.
NORMS_PER_BLOCK = {"llama": lambda d: 2 * d, "gpt2": lambda d: 4 * d, "bert": lambda d: 4 * d}  # RMSNorm: no bias


def batch_for(model, n=4, length=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.model_type == "bert":
        return {**batch, "labels": torch.tensor([0, 1, 2, 0])}
    return {**batch, "labels": ids.clone()}


def tiny(arch, seed=0):
    return models.tiny_model(arch, task="classification" if arch == "bert" else None, seed=seed)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_adapter_computes_its_formula():
    torch.manual_seed(0)
    module = adapter.BottleneckAdapter(16, 4, non_linearity="gelu", init_scale=0.1)
    torch.nn.init.normal_(module.up.weight)
    torch.nn.init.normal_(module.up.bias)
    torch.nn.init.normal_(module.down.bias)
    h = torch.randn(3, 16)
    expected = h + torch.nn.functional.gelu(h @ module.down.weight.T + module.down.bias) @ module.up.weight.T
    torch.testing.assert_close(module(h), expected + module.up.bias)
    assert sum(p.numel() for p in module.parameters()) == adapter.adapter_parameter_count(16, 4) == 2 * 16 * 4 + 20


@pytest.mark.parametrize("arch", ARCHS)
def test_adapted_model_starts_as_the_base_model(arch):
    """W_up = 0 at init (our choice; W_down ~ N(0, init_scale²)): each adapter is exactly the identity."""
    base, adapted = tiny(arch), tiny(arch)
    adapter.apply(adapted, adapter.AdapterConfig(bottleneck=8))
    batch = batch_for(base)
    torch.testing.assert_close(logits(adapted, batch), logits(base, batch), atol=1e-6, rtol=0)
    wrapped = [m for m in adapted.modules() if isinstance(m, adapter.AdapterWrapped)]
    assert len(wrapped) == 2 * adapted.config.num_hidden_layers
    assert all(
        w.adapter["default"].down.weight.abs().max() > 0 and not w.adapter["default"].up.weight.any() for w in wrapped
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", [("attention",), ("ffn",), ("attention", "ffn")])
@pytest.mark.parametrize("train_norms", [False, True])
def test_trainable_count_is_the_closed_form(arch, placement, train_norms):
    model = tiny(arch)
    total_before = count_parameters(model).total
    config = adapter.AdapterConfig(bottleneck=8, placement=placement, train_norms=train_norms)
    adapter.apply(model, config)
    d, blocks = model.config.hidden_size, model.config.num_hidden_layers
    adapters = blocks * len(placement) * adapter.adapter_parameter_count(d, 8)
    norms = blocks * NORMS_PER_BLOCK[arch](d) if train_norms else 0
    head = d * 3 + 3 if arch == "bert" else 0  # a classifier's new head trains by default, as with every method
    assert count_parameters(model).trainable == adapters + norms + head
    assert count_parameters(model).total == total_before + adapters
    assert summary_by_kind(model).loc["adapter", "trainable"] == adapters  # the names contain "adapter"
    assert all("adapter" in n or ("norm" in n.lower() or ".ln_" in n) or n.startswith("classifier.")
               for n, p in model.named_parameters() if p.requires_grad)  # fmt: skip


def test_a_subset_of_layers_gets_adapters_and_trains_only_its_norms():
    """AdapterDrop: no adapters in the lower blocks; nothing below the adapted blocks trains."""
    model = models.tiny_model("llama", seed=1)  # 2 blocks
    adapter.apply(model, adapter.AdapterConfig(bottleneck=4, layers=[1]))
    d = model.config.hidden_size
    assert count_parameters(model).trainable == 2 * adapter.adapter_parameter_count(d, 4) + 2 * d
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("model.layers.1.") for n in trained)
    assert "model.layers.1.self_attn.o_proj.adapter.default.down.weight" in trained
    assert "model.layers.1.mlp.down_proj.adapter.default.up.bias" in trained
    assert not isinstance(model.model.layers[0].self_attn.o_proj, adapter.AdapterWrapped)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_and_the_frozen_base_stays_bit_identical(arch):
    torch.manual_seed(0)
    model = tiny(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter.apply(model, adapter.AdapterConfig(bottleneck=8))
    norms = {
        n.replace(".base_layer.", ".") for n, p in model.named_parameters() if p.requires_grad and "adapter" not in n
    }
    config = train.TrainConfig(max_steps=20, learning_rate=1e-1, schedule="constant")
    history = train.train(model, [batch_for(model)], config, progress=False)
    # A frozen random-init head (std 0.02) caps how far the loss of a tiny model can fall: 0.08 to 0.2 here.
    assert history.losses[-1] < history.losses[0] - 0.05
    after = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if "adapter" not in n}
    assert after.keys() == before.keys()
    for name, param in after.items():
        assert torch.equal(param, before[name]) != (name in norms), name  # frozen: identical; norms: moved


def test_bert_base_on_the_meta_device_counts_2_379_264_adapter_parameters():
    """BERT-base, d = 768, m = 64: 12 blocks × 2 adapters × (2·768·64 + 768 + 64 = 99,136) = 2,379,264, plus 12 × 2
    LayerNorms × 2 × 768 = 36,864 when the norms train: 2,416,128 (2.2 % of the 109.5 M base)."""
    model = models.meta_model("bert-base")
    adapter.apply(model, adapter.AdapterConfig(bottleneck=64, train_norms=False))
    assert count_parameters(model).trainable == 12 * 2 * adapter.adapter_parameter_count(768, 64) == 2_379_264
    assert model.encoder.layer[0].output.dense.adapter["default"].up.weight.is_meta
    model = models.meta_model("bert-base")
    adapter.apply(model, adapter.AdapterConfig(bottleneck=64))
    assert count_parameters(model).trainable == 2_379_264 + 36_864 == 2_416_128


def test_a_single_placement_may_be_a_string():
    assert adapter.AdapterConfig(placement="ffn").placement == ("ffn",)
    assert adapter.AdapterConfig(layers=[3, 1]).layers == (3, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bottleneck": 0}, "bottleneck must be a whole number of at least 1"),
        (
            {"placement": ("attention", "mlp")},
            r"placement must be one or more of \('attention', 'ffn', 'ffn_after_norm'\)",
        ),
        ({"placement": ()}, "placement must be one or more"),
        ({"non_linearity": "tanh"}, "Unknown non_linearity 'tanh'; use one of relu, gelu"),
        ({"init_scale": 0.0}, "init_scale must be positive"),
        ({"layers": [1, 1]}, "distinct block indices"),
        ({"layers": [-1]}, "distinct block indices"),
    ],
)
def test_bad_configs_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adapter.AdapterConfig(**kwargs)


def test_bad_applications_say_what_to_change():
    with pytest.raises(ValueError, match=r"bottleneck=64 is wider than the hidden size d=32: .* choose 1\.\.32"):
        adapter.apply(models.tiny_model("gpt2"), adapter.AdapterConfig(bottleneck=64))
    with pytest.raises(ValueError, match=r"layers \[2\] out of range: .* has 2 blocks, choose from 0\.\.1"):
        adapter.apply(models.tiny_model("bert"), adapter.AdapterConfig(bottleneck=4, layers=(0, 2)))
    model = adapter.apply(models.tiny_model("llama"), adapter.AdapterConfig(bottleneck=4))
    with pytest.raises(ValueError, match=r"already has an adapter named 'default' \(adapter\): choose another name"):
        adapter.apply(model, adapter.AdapterConfig(bottleneck=4))
    with pytest.raises(TypeError, match="takes an AdapterConfig"):
        adapter.apply(models.tiny_model("llama"), object())


def test_pfeiffer_adapter_computes_its_formula_and_counts_one_adapter_per_block():
    """Pfeiffer: LN(s + g(LN(s))) around the FFN's output LayerNorm, one adapter per block, starting as the base."""
    base, model = tiny("bert"), tiny("bert")
    adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement=adapter.PFEIFFER, train_norms=False))
    batch = batch_for(base)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=1e-6, rtol=0)
    d, blocks = model.config.hidden_size, model.config.num_hidden_layers
    assert count_parameters(model).trainable == blocks * adapter.adapter_parameter_count(d, 4) + d * 3 + 3
    wrapped = model.bert.encoder.layer[0].output.LayerNorm
    assert isinstance(wrapped, adapter.AdapterAfterNorm)
    torch.manual_seed(0)
    bottleneck = wrapped.adapter["default"]
    for param in bottleneck.parameters():
        torch.nn.init.normal_(param)
    s = torch.randn(2, 5, d)
    norm = wrapped.base_layer
    expected = norm(s + bottleneck.up(torch.relu(bottleneck.down(norm(s)))))
    torch.testing.assert_close(wrapped(s), expected)


def test_houlsby_and_pfeiffer_together_and_the_meta_count_of_bert_base():
    model = models.meta_model("bert-base")
    adapter.apply(model, adapter.AdapterConfig(bottleneck=64, placement=adapter.PFEIFFER, train_norms=False))
    assert count_parameters(model).trainable == 12 * adapter.adapter_parameter_count(768, 64) == 1_189_632
    model = tiny("bert")
    adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement=(*adapter.HOULSBY, "ffn_after_norm")))
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, adapter.AdapterLayer)}
    assert kinds == {"AdapterWrapped", "AdapterAfterNorm"}


def test_bad_placements_and_missing_modules_say_what_to_change():
    with pytest.raises(
        ValueError, match=r"needs a LayerNorm after the FFN's residual add, and llama blocks are pre-norm"
    ):
        adapter.apply(models.tiny_model("llama"), adapter.AdapterConfig(bottleneck=4, placement=adapter.PFEIFFER))
    model = tiny("bert")
    del model.bert.encoder.layer[1].output.dense
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"has no module bert\.encoder\.layer\.1\.output\.dense, where placement"):
        adapter.apply(model, adapter.AdapterConfig(bottleneck=4))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # refused before anything changed
    assert not any(isinstance(m, adapter.AdapterLayer) for m in model.modules())
    with pytest.raises(ValueError, match=r"bottleneck=33 is wider than the hidden size d=32"):
        adapter.apply(tiny("bert"), adapter.AdapterConfig(bottleneck=33, placement=adapter.PFEIFFER))
    with pytest.raises(TypeError, match=r"wraps an nn\.LayerNorm, not Linear"):
        adapter.AdapterAfterNorm(torch.nn.Linear(4, 4))
