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
