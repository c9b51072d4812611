"""SFT data token by token: a conversation's answers trained, everything else masked; equal to trl's SFT collation."""

import warnings

import pytest

from peftlab import data, models
from peftlab.data import IGNORE_INDEX, DataError

CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And twice that?"},
    {"role": "assistant", "content": "8, since 2 × 4 = 8."},
]
#: SmolLM2's own template with trl's {% generation %} markers around each answer and its end of turn: it renders
#: the same text, and lets transformers (and trl) return the assistant tokens' mask.
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2():
    return models.load_causal_lm()


def trained_text(tokenizer, sample) -> list[str]:
    """The trained stretches of a sample, decoded."""
    pieces, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            pieces, current = [*pieces, tokenizer.decode(current)], []
    return pieces + ([tokenizer.decode(current)] if current else [])


def test_every_answer_and_its_end_of_turn_are_trained_and_nothing_else(smollm2):
    _, tokenizer = smollm2
    sample = data.tokenize_conversation(tokenizer, CONVERSATION)
    assert trained_text(tokenizer, sample) == ["4.<|im_end|>", "8, since 2 × 4 = 8.<|im_end|>"]
    assert tokenizer.decode(sample["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert [label for label in sample["labels"] if label != IGNORE_INDEX] == [
        token for token, label in zip(sample["input_ids"], sample["labels"], strict=True) if label != IGNORE_INDEX
    ]


def test_one_sample_per_turn_trains_only_its_last_answer(smollm2):
    _, tokenizer = smollm2
    first, second = data.tokenize_conversation_per_turn(tokenizer, CONVERSATION)
    assert trained_text(tokenizer, first) == ["4.<|im_end|>"]
    assert trained_text(tokenizer, second) == ["8, since 2 × 4 = 8.<|im_end|>"]
    whole = data.tokenize_conversation(tokenizer, CONVERSATION)
    assert (
        second["input_ids"] == whole["input_ids"]
        and first["input_ids"] == whole["input_ids"][: len(first["input_ids"])]
    )


def test_the_labels_are_trl_sft_with_an_assistant_only_loss(smollm2, tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = smollm2
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, assistant_only_loss=True,
                     max_length=None)  # fmt: skip
    marked = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    marked.chat_template = MARKED_TEMPLATE
    assert marked.apply_chat_template(CONVERSATION, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renamed gradient_checkpointing argument
        trainer = SFTTrainer(model=model, args=args, processing_class=marked,
                             train_dataset=datasets.Dataset.from_list([{"messages": CONVERSATION}]))  # fmt: skip
    theirs = trainer.data_collator([trainer.train_dataset[0]])
    ours = data.tokenize_conversation(tokenizer, CONVERSATION)
    assert theirs["input_ids"][0].tolist() == ours["input_ids"]
    assert theirs["labels"][0].tolist() == ours["labels"]


def test_pitfall_an_assistant_mask_without_generation_markers_masks_every_token(smollm2, tmp_path):
    """trl #4147: transformers' assistant mask is all zeros when the template has no {% generation %} markers, so an
    assistant-only loss trains nothing; trl 1.16 now refuses such a template, and peftlab needs no markers."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = smollm2
    encoded = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)  # fmt: skip
    assert set(encoded["assistant_masks"]) == {0}
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, assistant_only_loss=True)
    with pytest.raises(ValueError, match="generation"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        SFTTrainer(model=model, args=args, processing_class=tokenizer,
                   train_dataset=datasets.Dataset.from_list([{"messages": CONVERSATION}]))  # fmt: skip
    assert any(label != IGNORE_INDEX for label in data.tokenize_conversation(tokenizer, CONVERSATION)["labels"])


def test_bad_conversations_are_refused(smollm2):
    _, tokenizer = smollm2
    for conversation, words in [
        ([{"role": "user", "content": "Hi"}], "no assistant turn"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}], "empty"),
        ("Hi", "list of"),
    ]:
        with pytest.raises(DataError, match=words):
            data.tokenize_conversation(tokenizer, conversation)
    with pytest.raises(DataError, match="max_length=10"):
        data.tokenize_conversation(tokenizer, CONVERSATION, max_length=10)
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        data.tokenize_conversation(bare, CONVERSATION)
