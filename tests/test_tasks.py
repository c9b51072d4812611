"""The sentiment task of notebooks 01, 08 and 09: its data by profile, its loaders, its fresh model, its evaluation
and its fine-tune, checked by their numbers (on the offline MiniLM and the teaching headlines)."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftlab import data, env
from peftlab.methods import adalora, lora
from peftlab.tasks import DATASETS, SentimentTask

CPU = torch.device("cpu")


def smoke_run(seed: int = 0) -> env.Run:
    return env.Run(profile="smoke", device=CPU, seed=seed)


@pytest.fixture(scope="module")
def task() -> SentimentTask:
    return SentimentTask(smoke_run())


class Oracle(nn.Module):
    """A stand-in classifier whose logits pick, for each row, the class ``answer(ids)`` names (``ids``: the row's
    tokens without the padding)."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.anchor = nn.Parameter(torch.zeros(()))  # the metrics read the device from a parameter

    def forward(self, input_ids, attention_mask):
        rows = [tuple(ids[: sum(mask)]) for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True)]
        classes = torch.tensor([self.answer(row) for row in rows])
        return SimpleNamespace(logits=nn.functional.one_hot(classes, 3).float() + self.anchor)


# ----------------------------------------------------------------------------------------------------------------
# The data and the loaders
# ----------------------------------------------------------------------------------------------------------------
def test_the_smoke_profile_reads_the_english_teaching_headlines(task):
    assert task.dataset == DATASETS["smoke"] == "fin_headlines"
    assert (len(task.train_rows), len(task.val_rows)) == (240, 60)  # 300 English headlines, every fifth validates
    assert {row["lang"] for row in task.train_rows + task.val_rows} == {"en"}
    assert task.labels == ["bearish", "bullish", "neutral"]
    assert task.batch_size == 16 and task.max_length == 64
    assert task.train_rows == data.load("fin_headlines", "train", languages=("en",))


def test_the_full_profile_reads_the_public_tweets(public_data_dir):
    task = SentimentTask(env.Run(profile="full", device=CPU, seed=0))
    assert task.dataset == "fin_tweets"
    assert (len(task.train_rows), len(task.val_rows), task.batch_size) == (9543, 2388, 32)


def test_features_are_the_tokenised_rows_with_their_labels(task):
    assert len(task.train_features) == 240 and len(task.val_features) == 60
    assert max(len(feature["input_ids"]) for feature in task.train_features + task.val_features) <= 64
    first = task.train_features[0]
    assert first["input_ids"] == task.tokenizer(task.train_rows[0]["text"])["input_ids"]
    assert [f["labels"] for f in task.val_features] == [row["label"] for row in task.val_rows]


def test_the_training_loader_shuffles_the_same_way_every_time_and_covers_every_row(task):
    def epoch(loader):
        return [tuple(batch["labels"].tolist()) for batch in loader]

    first, again = epoch(task.train_loader()), epoch(task.train_loader())
    assert first == again  # seeded: the same batches in the same order
    assert [len(batch) for batch in first] == [16] * 15  # 240 rows, 16 a batch
    assert Counter(label for batch in first for label in batch) == Counter(r["label"] for r in task.train_rows)
    in_file_order = [row["label"] for row in task.train_rows[:16]]
    assert list(first[0]) != in_file_order  # shuffled
    assert epoch(SentimentTask(smoke_run(seed=1)).train_loader()) != first  # another seed, another order


def test_a_subset_loads_alone_and_the_validation_loader_keeps_the_file_order(task):
    sample = task.train_features[:40]
    assert sum(len(batch["labels"]) for batch in task.train_loader(sample)) == 40
    batches = list(task.val_loader)
    assert [len(batch["labels"]) for batch in batches] == [60]  # one batch of at most 128
    assert batches[0]["labels"].tolist() == [row["label"] for row in task.val_rows]


# ----------------------------------------------------------------------------------------------------------------
# The fresh model and the evaluation
# ----------------------------------------------------------------------------------------------------------------
def test_a_fresh_model_starts_from_the_same_head_for_the_same_seed(task):
    first, again, other = task.fresh_model(), task.fresh_model(), task.fresh_model(seed=1)
    assert first.config.num_labels == 3 and first.config.id2label == dict(enumerate(task.labels))
    torch.testing.assert_close(first.classifier.weight, again.classifier.weight, rtol=0, atol=0)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    # the pretrained encoder is the same whatever the seed
    torch.testing.assert_close(first.bert.encoder.layer[0].attention.self.query.weight,
                               other.bert.encoder.layer[0].attention.self.query.weight, rtol=0, atol=0)  # fmt: skip
    # and what is drawn next (LoRA's A, dropout masks) is the same after every fresh model of a seed
    task.fresh_model(seed=7)
    drawn = torch.rand(3)
    task.fresh_model(seed=7)
    assert torch.equal(torch.rand(3), drawn)


def test_evaluate_gives_accuracy_and_macro_f1_of_the_validation_set(task):
    labels = [row["label"] for row in task.val_rows]
    truth = {tuple(f["input_ids"]): f["labels"] for f in task.val_features}
    assert task.evaluate(Oracle(truth.get)) == {"accuracy": 1.0, "macro_f1": 1.0}

    share = labels.count(2) / len(labels)  # always "neutral": right on the neutral share, F1 of one class only
    always_neutral = task.evaluate(Oracle(lambda row: 2))
    assert always_neutral["accuracy"] == pytest.approx(share)
    assert always_neutral["macro_f1"] == pytest.approx(2 * share / (1 + share) / 3)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------------------
def test_fine_tune_trains_the_steps_on_the_schedule_and_ends_with_the_validation_metrics(task):
    model = lora.apply(task.fresh_model(), lora.LoRAConfig(r=2, target_modules=("query", "value")))
    history = task.fine_tune(model, steps=10, learning_rate=1e-3, eval_every=4, progress=False)
    assert history.steps == list(range(1, 11))
    assert [e["step"] for e in history.evaluations] == [4, 8, 10]
    # warm-up over a tenth of the steps (one here: half the rate), then linear decay towards 0
    expected = [1e-3 / 2] + [1e-3 * (1 - (step - 1) / 9) for step in range(1, 10)]
    assert history.learning_rates == pytest.approx(expected)
    assert history.final == {"step": 10, **task.evaluate(model)}
    assert history.trainable_parameters == 6 * 2 * 2 * (384 + 384) + 384 * 3 + 3  # LoRA q, v and the new classifier


def test_fine_tuning_twice_from_a_fresh_model_repeats_every_loss(task):
    def run_once():
        model = lora.apply(task.fresh_model(), lora.LoRAConfig(r=2, target_modules=("query", "value")))
        return task.fine_tune(model, steps=4, learning_rate=1e-3, progress=False).losses

    assert run_once() == run_once()


def test_fine_tune_gives_a_model_with_adalora_its_loss_and_allocator(task):
    config = adalora.AdaLoRAConfig(total_steps=4, init_r=4, target_r=2, t_init=1, t_final=1, delta_t=1,
                                   target_modules=("query", "value"))  # fmt: skip
    model = adalora.apply(task.fresh_model(), config)
    history = task.fine_tune(model, steps=4, learning_rate=1e-3, progress=False)
    assert isinstance(history.method_state, adalora.RankAllocator)
    for total, task_loss, orthogonality in zip(history.losses, history.metrics["task_loss"],
                                               history.metrics["orthogonality"], strict=True):  # fmt: skip
        assert total == pytest.approx(task_loss + config.orth_reg_weight * orthogonality, rel=1e-6)
    assert sum(adalora.ranks(model).values()) == 2 * 12  # the budget reached: target_r on 12 layers


def test_a_loader_given_replaces_the_training_loader(task):
    model = lora.apply(task.fresh_model(), lora.LoRAConfig(r=2, target_modules=("query",)))
    drawn = []

    def watched():
        while True:
            for batch in task.train_loader(task.train_features[:32]):
                drawn.append(len(batch["labels"]))
                yield batch

    task.fine_tune(model, steps=3, learning_rate=1e-3, loader=watched(), progress=False)
    assert drawn == [16, 16, 16]


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def test_an_unknown_data_set_is_refused_with_the_close_names():
    with pytest.raises(data.DataError, match=r"Unknown data set 'fin_tweet'\. Did you mean 'fin_tweets'.* sentiment"):
        SentimentTask(smoke_run(), dataset="fin_tweet")


def test_a_data_set_of_another_task_or_with_other_labels_is_refused(monkeypatch):
    with pytest.raises(data.DataError, match=r"instructions is an instruction data set; .* SentimentTask trains on a "
                                             r"sentiment set: fin_headlines, fin_tweets"):  # fmt: skip
        SentimentTask(smoke_run(), dataset="instructions")
    monkeypatch.setitem(data.TEACHING_SETS, "moods", {"file": "moods.jsonl", "task": "classification",
                                                      "labels": ("sad", "happy")})  # fmt: skip
    with pytest.raises(data.DataError, match="moods's labels are sad, happy, not the sentiment classes bearish"):
        SentimentTask(smoke_run(), dataset="moods")


def test_languages_without_rows_are_refused():
    with pytest.raises(data.DataError, match="fin_headlines has no train rows in the languages fr"):
        SentimentTask(smoke_run(), languages=("fr",))


@pytest.mark.parametrize(("keyword", "value"), [("max_length", 0), ("batch_size", 2.5), ("eval_batch_size", True)])
def test_sizes_must_be_whole_positive_numbers(keyword, value):
    with pytest.raises(ValueError, match=f"{keyword} must be a whole number of at least 1"):
        SentimentTask(smoke_run(), **{keyword: value})


def test_the_run_must_be_what_env_setup_returns():
    with pytest.raises(TypeError, match=r"takes the Run that env\.setup"):
        SentimentTask("smoke")


def test_an_empty_training_subset_is_refused(task):
    with pytest.raises(ValueError, match="No training features"):
        task.train_loader([])
