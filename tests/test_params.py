import pytest

from peftlab import models
from peftlab.params import (
    KINDS,
    count_parameters,
    kind_of,
    layer_of,
    parameter_table,
    plot_by_kind,
    summary_by_kind,
    summary_by_layer,
)


@pytest.mark.parametrize(
    ("name", "layer"),
    [("model.layers.3.mlp.up_proj.weight", 3), ("transformer.h.11.attn.c_attn.bias", 11),
     ("bert.encoder.layer.0.output.dense.weight", 0), ("model.embed_tokens.weight", None), ("classifier.bias", None)],
)  # fmt: skip
def test_layer_index_from_the_name(name, layer):
    assert layer_of(name) == layer


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_kinds_cover_every_parameter_and_sum_to_the_total(arch):
    model = models.tiny_model(arch, task="classification")
    table = parameter_table(model)
    assert set(table["kind"]) <= set(KINDS) and "other" not in set(table["kind"])
    assert summary_by_kind(model)["total"].sum() == count_parameters(model).total
    assert summary_by_layer(model)["total"].sum() == count_parameters(model).total


def test_kinds_of_a_llama_block_match_the_formula():
    model = models.meta_model(models.tiny_config("llama"))
    config = model.config
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * d // config.num_attention_heads  # width of the shared keys and values
    by_kind = summary_by_kind(model)["total"]
    layers = config.num_hidden_layers
    assert by_kind["attention"] == layers * (2 * d * d + 2 * d * kv)  # q, o: d×d; k, v: d×kv (grouped-query)
    assert by_kind["ffn"] == layers * 3 * d * f  # SwiGLU: gate, up, down
    assert by_kind["norm"] == (2 * layers + 1) * d  # RMSNorm: one weight vector each, no bias
    assert by_kind["embedding"] == config.vocab_size * d  # tied with the LM head: counted once


def test_bert_attention_output_is_attention_and_block_output_is_ffn():
    model = models.tiny_model("bert")
    modules = dict(model.named_modules())
    assert kind_of("encoder.layer.0.attention.output.dense.weight", modules["encoder.layer.0.attention.output.dense"]) \
        == "attention"  # fmt: skip
    assert kind_of("encoder.layer.0.output.dense.weight", modules["encoder.layer.0.output.dense"]) == "ffn"
    assert kind_of("encoder.layer.0.output.LayerNorm.weight", modules["encoder.layer.0.output.LayerNorm"]) == "norm"


def test_method_parameters_are_their_own_kind():
    assert kind_of("model.layers.0.self_attn.q_proj.lora_A.default.weight", None) == "lora"
    assert kind_of("bert.encoder.layer.1.output.adapter.down.weight", None) == "adapter"


def test_counts_follow_requires_grad():
    model = models.tiny_model("gpt2")
    model.requires_grad_(False)
    model.transformer.ln_f.requires_grad_(True)
    counted = count_parameters(model)
    assert counted.trainable == 2 * model.config.n_embd
    assert counted.frozen == counted.total - counted.trainable
    assert f"{counted.percent:.4g} %" in str(counted)
    by_kind = summary_by_kind(model)
    assert by_kind.loc["norm", "trainable"] == counted.trainable and by_kind["trainable"].sum() == counted.trainable


def test_plot_by_kind_draws_a_bar_per_kind():
    model = models.tiny_model("bert", task="classification")
    ax = plot_by_kind(model)
    assert [label.get_text() for label in ax.get_yticklabels()] == list(summary_by_kind(model).index)
