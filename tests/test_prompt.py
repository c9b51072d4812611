"""Prompt tuning and P-tuning: equal to peft 0.21 on the same weights, counts from the formulas, training moves only
the prompt, initialisation from text, counting on the meta device, and the errors."""

import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_trains_and_leaves_the_base_bit_identical
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from torch.testing import assert_close
from transformers import PreTrainedTokenizerFast

from peftlab import models
from peftlab.methods import prompt
from peftlab.params import count_parameters, parameter_table

# (tiny architecture, peftlab task, peft task type)
CASES = [("llama", "causal_lm", "CAUSAL_LM"), ("gpt2", "causal_lm", "CAUSAL_LM"), ("bert", "classification", "SEQ_CLS")]
N = 4  # virtual tokens


def make_batch(task: str, bert: bool = False) -> dict:
    """Two sequences of 6 tokens, the second right-padded after 4; token labels for LMs, classes for classifiers."""
    input_ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100) if task == "causal_lm" else torch.tensor([0, 2])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if bert:
        batch["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    return batch


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def head_size(model) -> int:
    head = prompt.classification_head(model)
    return sum(p.numel() for p in head.parameters()) if head is not None else 0


def assert_same_outputs(ours, theirs, batch):
    """fp32, same weights, same operations: logits and loss agree to 1e-5 absolute."""
    with torch.no_grad():
        mine, reference = ours(**batch), theirs(**batch)
    assert mine.logits.shape == reference.logits.shape
    assert_close(mine.logits, reference.logits, atol=1e-5, rtol=0)
    assert_close(mine.loss, reference.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "task", "task_type"), CASES)
def test_prompt_tuning_equals_peft_with_the_same_prompt(arch, task, task_type):
    classifier = task_type == "SEQ_CLS"  # peft always trains the classifier for SEQ_CLS: ask for the same
    ours = prompt.apply(models.tiny_model(arch, task), prompt.PromptTuningConfig(N, train_head=classifier)).eval()
    theirs = peft.get_peft_model(
        models.tiny_model(arch, task), peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=N)
    ).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.soft_prompt)
    assert_same_outputs(ours, theirs, make_batch(task, bert=arch == "bert"))

    d = ours.config.hidden_size
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0] == N * d + head_size(ours.base_model)
    assert prompt.closed_form_count(ours.base_model, prompt.PromptTuningConfig(N)) == N * d


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize(("arch", "task", "task_type"), CASES)
def test_p_tuning_equals_peft_with_the_same_encoder(arch, task, task_type, encoder):
    classifier = task_type == "SEQ_CLS"
    config = prompt.PTuningConfig(N, encoder=encoder, encoder_hidden_size=10, train_head=classifier)
    ours = prompt.apply(models.tiny_model(arch, task), config).eval()
    theirs = peft.get_peft_model(
        models.tiny_model(arch, task),
        peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=N, encoder_hidden_size=10,
                                 encoder_reparameterization_type=encoder.upper()),
    ).eval()  # fmt: skip
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())  # same names and shapes
    assert_same_outputs(ours, theirs, make_batch(task, bert=arch == "bert"))

    d, h = ours.config.hidden_size, 10
    if encoder == "mlp":
        formula = N * d + (d * h + h) + (h * h + h) + (h * d + d)
    else:  # two bidirectional LSTM layers (inputs d, then 2h), then 2h -> 2h -> d
        lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
        formula = N * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    assert prompt.closed_form_count(ours.base_model, config) == formula
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0] == formula + head_size(ours.base_model)


def test_fold_replaces_the_encoder_by_the_prompt_it_computes():
    model = prompt.apply(models.tiny_model("llama"), prompt.PTuningConfig(N, encoder="lstm")).eval()
    batch = make_batch("causal_lm")
    with torch.no_grad():
        before = model(**batch).logits
    folded = prompt.fold(model)
    assert isinstance(folded, prompt.PromptTunedModel) and folded.base_model is model.base_model
    assert count_parameters(folded).trainable == N * folded.config.hidden_size
    with torch.no_grad():
        assert_close(folded(**batch).logits, before, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="fold takes the PTunedModel"):
        prompt.fold(folded)


def test_causal_lm_labels_skip_the_virtual_tokens():
    model = prompt.apply(models.tiny_model("llama"), prompt.PromptTuningConfig(N)).eval()
    batch = make_batch("causal_lm")
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.shape[1] == N + batch["input_ids"].shape[1]  # logits of the virtual tokens too
    # Labels [-100] * N + labels, shifted by one: the last virtual token predicts the first real one (which the
    # model alone never predicts); no virtual token is a target.
    predicting = output.logits[:, N - 1 : -1]
    expected = F.cross_entropy(predicting.reshape(-1, predicting.shape[-1]), batch["labels"].reshape(-1))
    assert_close(output.loss, expected)


@pytest.mark.parametrize(
    "config", [prompt.PromptTuningConfig(N), prompt.PTuningConfig(N, encoder="lstm", train_head=True)], ids=repr
)
def test_the_trained_parameters_are_named_as_the_prompt_kind(config):
    model = prompt.apply(models.tiny_model("bert", task="classification"), config)
    table = parameter_table(model)
    trained = table[table["trainable"]]
    assert set(trained["kind"]) == {"prompt", "head"}  # a classifier's new head trains by default, or when asked
    frozen_head = prompt.apply(models.tiny_model("bert", task="classification"), prompt.PromptTuningConfig(N,
                               train_head=False))  # fmt: skip
    table = parameter_table(frozen_head)
    assert set(table.loc[table["trainable"], "kind"]) == {"prompt"}
    assert set(table.loc[table["kind"] == "prompt", "name"].str.split(".").str[0]) <= {"soft_prompt", "prompt_encoder"}


@pytest.mark.parametrize(
    ("arch", "task", "config"),
    [
        ("llama", "causal_lm", prompt.PromptTuningConfig(N)),
        ("llama", "causal_lm", prompt.PTuningConfig(N, encoder="lstm")),
        ("bert", "classification", prompt.PTuningConfig(N, train_head=True)),
    ],
    ids=["prompt-llama", "p-tuning-lstm-llama", "p-tuning-mlp-bert-with-head"],
)
def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(arch, task, config):
    assert_trains_and_leaves_the_base_bit_identical(prompt.apply, arch, task, config)


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "classify", "the", "sentiment", "of", "this", "review"]
    backend = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.mark.parametrize(
    ("n", "expected_ids"), [(7, [1, 2, 3, 1, 2, 3, 1]), (3, [1, 2, 3])], ids=["repeated", "exact"]
)  # fmt: skip
def test_text_init_copies_the_word_embeddings_of_the_text(n, expected_ids):
    base = models.tiny_model("llama")
    config = prompt.PromptTuningConfig.from_text("classify the sentiment", word_level_tokenizer(), n)
    model = prompt.apply(base, config)
    assert_close(model.soft_prompt.data, base.get_input_embeddings().weight[expected_ids], atol=0, rtol=0)


def test_an_init_text_longer_than_the_prompt_is_refused_where_peft_cuts_it(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"3 tokens long, more than the 2 virtual tokens: its last 1 tokens would be "
        r"dropped \(peft drops them silently\)\. .* num_virtual_tokens=3",
    ):
        prompt.PromptTuningConfig.from_text("classify the sentiment", word_level_tokenizer(), 2)
    with pytest.raises(ValueError, match="more than the 1 virtual tokens"):
        prompt.PromptTuningConfig(1, init="text", init_text="two tokens", init_token_ids=(1, 2))
    # what is refused: peft keeps the text's first n tokens ("classify the") and drops "sentiment" without a word
    word_level_tokenizer().save_pretrained(tmp_path)
    base = models.tiny_model("llama")
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the sentiment", tokenizer_name_or_path=str(tmp_path)))  # fmt: skip
    their_prompt = theirs.prompt_encoder["default"].embedding.weight
    assert_close(their_prompt.data, base.get_input_embeddings().weight[[1, 2]], atol=0, rtol=0)


def test_vocab_init_copies_rows_of_the_vocabulary():
    base = models.tiny_model("gpt2")
    model = prompt.apply(base, prompt.PromptTuningConfig(5, init="vocab"))
    vocabulary = base.get_input_embeddings().weight
    assert all((vocabulary == row).all(dim=1).any() for row in model.soft_prompt.data)


def test_random_init_is_uniform_in_half_a_unit():
    model = prompt.apply(models.tiny_model("llama"), prompt.PromptTuningConfig(50))
    assert model.soft_prompt.dtype == torch.float32
    assert model.soft_prompt.abs().max() <= 0.5


def test_counting_on_the_meta_device_needs_no_weights():
    model = prompt.apply(models.meta_model("llama-2-7b"), prompt.PromptTuningConfig(20))
    assert count_parameters(model).trainable == 20 * 4096
    assert model.soft_prompt.is_meta
    config = prompt.PTuningConfig(20, encoder="lstm")  # h = d = 4096: the LSTM is far larger than the prompt
    model = prompt.apply(models.meta_model("llama-2-7b"), config)
    assert count_parameters(model).trainable == prompt.closed_form_count(model.base_model, config)


def test_bad_configs_say_what_to_change():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer of at least 1, got 0"):
        prompt.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="at least 1"):
        prompt.PTuningConfig(num_virtual_tokens=-3)
    with pytest.raises(
        ValueError, match=r"needs the text's tokens: build the config with PromptTuningConfig\.from_text"
    ):
        prompt.PromptTuningConfig(init="text")
    with pytest.raises(ValueError, match="init_text must be a non-empty text"):
        prompt.PromptTuningConfig.from_text("  ", word_level_tokenizer())
    with pytest.raises(ValueError, match="Unknown init 'words'"):
        prompt.PromptTuningConfig(init="words")
    with pytest.raises(ValueError, match="Unknown encoder 'gru'; use one of 'mlp', 'lstm'"):
        prompt.PTuningConfig(encoder="gru")
    with pytest.raises(ValueError, match="encoder_hidden_size must be at least 1"):
        prompt.PTuningConfig(encoder_hidden_size=0)


def test_bad_calls_say_what_to_change():
    other_vocabulary = prompt.PromptTuningConfig(4, init="text", init_text="hello", init_token_ids=(5, 4000))
    base = models.tiny_model("llama")
    with pytest.raises(ValueError, match=r"reach 4000, but the model's vocabulary has 128 tokens: .* another model's"):
        prompt.apply(base, other_vocabulary)
    assert all(p.requires_grad for p in base.parameters())  # refused before anything changed
    with pytest.raises(ValueError, match="has no classification head"):
        prompt.apply(models.tiny_model("llama"), prompt.PromptTuningConfig(4, train_head=True))
    wrapped = prompt.apply(models.tiny_model("llama"), prompt.PromptTuningConfig(4))
    with pytest.raises(TypeError, match="not to an already wrapped one"):
        prompt.apply(wrapped, prompt.PromptTuningConfig(4))
    with pytest.raises(TypeError, match="PromptTuningConfig or PTuningConfig"):
        prompt.apply(models.tiny_model("llama"), object())
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        wrapped_bert = prompt.apply(models.tiny_model("bert", task="classification"), prompt.PromptTuningConfig(100))
        wrapped_bert(input_ids=torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="never trained past that position"):  # rotary positions: refused too
        wrapped(input_ids=torch.ones(1, 125, dtype=torch.long))
