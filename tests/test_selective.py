import pytest
import torch

from peftlab import models
from peftlab.methods import selective
from peftlab.params import count_parameters


def bert_block_params(d: int, f: int) -> int:
    """q, k, v, o with biases; two LayerNorms; FFN up and down with biases."""
    return 4 * d * d + 2 * d * f + 9 * d + f


@pytest.mark.parametrize("k", [0, 1, 2])
def test_freeze_trains_top_blocks_and_head_exactly(k):
    model = models.tiny_model("bert", task="classification", num_labels=3)
    d, f = model.config.hidden_size, model.config.intermediate_size
    selective.apply(model, selective.FreezeConfig(trainable_layers=k))
    head = d * d + d + 3 * d + 3  # pooler and classifier
    assert count_parameters(model).trainable == k * bert_block_params(d, f) + head
    trained_layers = {int(n.split(".layer.")[1].split(".")[0]) for n, p in model.named_parameters()
                      if p.requires_grad and ".layer." in n}  # fmt: skip
    assert trained_layers == set(range(model.config.num_hidden_layers - k, model.config.num_hidden_layers))


def test_freeze_counts_on_a_real_architecture_without_weights():
    model = models.meta_model("bert-base")  # BertModel: the pooler is its head
    selective.apply(model, selective.FreezeConfig(trainable_layers=3))
    assert count_parameters(model).trainable == 3 * bert_block_params(768, 3072) + 768 * 768 + 768


def test_freeze_on_a_decoder_without_head_parameters():
    model = models.tiny_model("llama")  # tied LM head: nothing of kind "head" to train
    selective.apply(model, selective.FreezeConfig(trainable_layers=1))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)


def test_full_unfreezes_everything_after_freeze():
    model = models.tiny_model("gpt2")
    selective.apply(model, selective.FreezeConfig(trainable_layers=0, train_head=False))
    assert count_parameters(model).trainable == 0
    selective.apply(model, selective.FullConfig())
    assert count_parameters(model).trainable == count_parameters(model).total


def test_too_many_layers_says_how_many_there_are():
    model = models.tiny_model("llama")
    with pytest.raises(ValueError, match=r"trainable_layers=5, but LlamaForCausalLM has 2 blocks: choose 0\.\.2"):
        selective.apply(model, selective.FreezeConfig(trainable_layers=5))


def test_negative_layers_and_wrong_config_are_refused():
    with pytest.raises(ValueError, match="0 or more"):
        selective.FreezeConfig(trainable_layers=-1)
    with pytest.raises(TypeError, match="takes one of FullConfig, FreezeConfig, BitFitConfig, LinearProbeConfig"):
        selective.apply(models.tiny_model("gpt2"), object())


def test_bitfit_trains_biases_and_head_exactly():
    model = models.meta_model("bert-base")
    selective.apply(model, selective.BitFitConfig())
    d, f, layers = 768, 3072, 12
    embedding_norm_beta = d  # the embedding LayerNorm's beta is a bias (its gamma is a weight)
    per_block = 4 * d + d + f + 2 * d  # q, k, v, o; FFN down (d) and up (f); two LayerNorm betas
    pooler = d * d + d  # the head trains whole
    assert count_parameters(model).trainable == embedding_norm_beta + layers * per_block + pooler


def test_bitfit_on_minilm_counts_the_published_26112_biases():
    model = models.meta_model("minilm-l6")
    selective.apply(model, selective.BitFitConfig(train_head=False))
    assert count_parameters(model).trainable == 26_112


def test_bitfit_refuses_a_model_without_biases():
    with pytest.raises(ValueError, match="no bias parameters, so BitFit has nothing to train"):
        selective.apply(models.meta_model("smollm2-135m"), selective.BitFitConfig())


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_linear_probe_trains_the_classifier_alone_on_the_pooled_hidden_state(pooling):
    model = models.tiny_model("bert", task="classification")
    selective.apply(model, selective.LinearProbeConfig(pooling))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    features = hidden[:, 0] if pooling == "cls" else (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = model.classifier(features)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)
    with pytest.raises(ValueError, match="apply it to a fresh model"):
        selective.apply(model, selective.FreezeConfig(0))
    with pytest.raises(ValueError, match="Unknown pooling 'max'"):
        selective.LinearProbeConfig("max")


def bert_bias_counts(d: int, f: int, layers: int) -> dict[str, int]:
    """Bias parameters of a BERT encoder (BertModel: its pooler, no classifier) by kind, from the shapes: each block
    has d-wide biases on q, k, v, the attention output and the FFN output, an f-wide one on the FFN's first layer,
    and two LayerNorm βs of d; the embeddings add one more LayerNorm β; the pooler (d × d) one bias of d."""
    per_block = {"query": d, "key": d, "value": d, "attention_output": d, "intermediate": f, "ffn_output": d}
    return {**{kind: layers * n for kind, n in per_block.items()}, "norm": (2 * layers + 1) * d, "pooler": d}


@pytest.mark.parametrize(("name", "d", "f", "layers"), [("bert-base", 768, 3072, 12), ("minilm-l6", 384, 1536, 6)])
def test_bias_kinds_count_every_bias_of_a_bert_by_its_module(name, d, f, layers):
    model = models.meta_model(name)
    sizes = dict(model.named_parameters())
    counted = {}
    for param_name, kind in selective.bias_kinds(model).items():
        counted[kind] = counted.get(kind, 0) + sizes[param_name].numel()
    assert counted == bert_bias_counts(d, f, layers)
    assert set(selective.bias_kinds(model)) == {n for n in sizes if n.endswith("bias")}


def test_bias_kinds_follow_each_family_s_names():
    gpt2 = {"qkv", "attention_output", "intermediate", "ffn_output", "norm"}
    assert set(selective.bias_kinds(models.tiny_model("gpt2")).values()) == gpt2
    assert set(selective.bias_kinds(models.tiny_model("qwen2")).values()) == {"query", "key", "value"}
    classifier = models.tiny_model("bert", task="classification")
    assert selective.bias_kinds(classifier)["classifier.bias"] == "classifier"


@pytest.mark.parametrize("train_head", [False, True])
def test_bitfit_on_the_query_and_intermediate_biases_alone_counts_exactly(train_head):
    model = models.meta_model("bert-base")
    selective.apply(model, selective.BitFitConfig(biases=("query", "intermediate"), train_head=train_head))
    d, f, layers = 768, 3072, 12
    pooler = d * d + d if train_head else 0  # the head (BertModel's pooler) trains whole, or not at all
    assert count_parameters(model).trainable == layers * (d + f) + pooler


def test_bitfit_without_the_layernorm_biases_counts_exactly():
    model = models.meta_model("minilm-l6")
    kinds = [kind for kind in selective.BIAS_KINDS if kind in selective.bias_kinds(model).values() and kind != "norm"]
    selective.apply(model, selective.BitFitConfig(biases=tuple(kinds), train_head=False))
    d, f, layers = 384, 1536, 6
    assert count_parameters(model).trainable == layers * (5 * d + f) + d == 26_112 - (2 * layers + 1) * d


def test_bitfit_trains_the_same_biases_as_peft_bias_all():
    """peft has no BitFit; its nearest is a LoRA config with bias="all", which also sets every `.bias` trainable."""
    import peft

    ours = selective.apply(models.tiny_model("bert", task="classification"), selective.BitFitConfig(train_head=False))
    theirs = peft.get_peft_model(models.tiny_model("bert", task="classification"),
                                 peft.LoraConfig(target_modules=["query"], bias="all"))  # fmt: skip
    their_biases = {n.removeprefix("base_model.model.").replace(".base_layer", "")
                    for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n}  # fmt: skip
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == their_biases


def test_unknown_bias_kinds_are_refused_with_the_list_of_kinds():
    with pytest.raises(ValueError, match=r"Unknown bias kind\(s\) 'querry' \(did you mean 'query'\?\); the kinds are "
                                         r"query, key, value, qkv, attention_output"):  # fmt: skip
        selective.BitFitConfig(biases=("querry", "intermediate"))
    with pytest.raises(TypeError, match="a tuple of bias kinds"):
        selective.BitFitConfig(biases="query")
    with pytest.raises(ValueError, match="selects no bias"):
        selective.BitFitConfig(biases=())
    assert selective.BitFitConfig(biases=["query"]).biases == ("query",)


def test_a_bias_kind_the_model_lacks_is_refused_before_anything_changes():
    model = models.tiny_model("gpt2")  # q, k and v are one fused c_attn
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no 'query' biases; its bias kinds are qkv, "
                                         r"attention_output, intermediate, ffn_output, norm"):  # fmt: skip
        selective.apply(model, selective.BitFitConfig(biases=("query",)))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
