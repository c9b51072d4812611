import math

import pytest
import torch

from peftlab import data, models, train
from peftlab.methods import selective


def token_batches(model, n=4, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, length), generator=generator)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def test_loss_falls_when_memorising_a_batch():
    model = models.tiny_model("llama")
    config = train.TrainConfig(max_steps=40, learning_rate=1e-2, schedule="constant")
    history = train.train(model, token_batches(model), config, progress=False)
    assert history.losses[-1] < 0.1 * history.losses[0]
    assert history.steps == list(range(1, 41)) and len(history.step_seconds) == 40
    assert history.seconds_per_step > 0 and history.total_seconds >= sum(history.step_seconds[1:])
    assert history.peak_memory_bytes is None and history.device == "cpu"


def test_gradient_accumulation_equals_one_large_batch():
    """Two micro-batches of 2 with accumulation give the SGD update of one batch of 4 (equal lengths, so the mean
    of the two means is the mean over the batch)."""
    reference = models.tiny_model("gpt2", seed=3)
    accumulated = models.tiny_model("gpt2", seed=3)
    (big,) = token_batches(reference, n=4)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    config = train.TrainConfig(max_steps=1, learning_rate=1e-2, max_grad_norm=None, schedule="constant")
    train.train(reference, [big], config, optimizer=torch.optim.SGD(reference.parameters(), lr=0.1), progress=False)
    train.train(accumulated, halves, train.TrainConfig(**{**config.__dict__, "grad_accum_steps": 2}),
                optimizer=torch.optim.SGD(accumulated.parameters(), lr=0.1), progress=False)  # fmt: skip
    for a, b in zip(reference.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_do_not_move_and_trained_ones_do():
    model = models.tiny_model("bert", task="classification")
    selective.apply(model, selective.FreezeConfig(trainable_layers=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"input_ids": torch.randint(3, 128, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 0])}  # fmt: skip
    train.train(model, [batch], train.TrainConfig(max_steps=3, learning_rate=1e-2, weight_decay=0.1), progress=False)
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == param.requires_grad, name


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("constant", [0.5, 1.0, 1.0, 1.0, 1.0]), ("linear", [0.5, 1.0, 0.75, 0.5, 0.25]),
     ("cosine", [0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])],
)  # fmt: skip
def test_schedules_warm_up_then_decay(schedule, expected):
    config = train.TrainConfig(max_steps=5, warmup_steps=1, schedule=schedule)
    assert [train.learning_rate_factor(step, config) for step in range(5)] == pytest.approx(expected)


def test_evaluation_runs_every_n_steps_and_at_the_end():
    model = models.tiny_model("llama")
    calls = []

    def evaluate(m):
        assert not m.training and not torch.is_grad_enabled()
        calls.append(1)
        return {"n": len(calls)}

    history = train.train(model, token_batches(model), train.TrainConfig(max_steps=7, eval_every=3),
                          evaluate=evaluate, progress=False)  # fmt: skip
    assert [e["step"] for e in history.evaluations] == [3, 6, 7]
    assert history.final == {"step": 7, "n": 3}
    assert model.training is False


def test_a_custom_optimizer_keeps_its_groups_rates_under_the_schedule():
    model = models.tiny_model("llama")
    groups = [{"params": [model.model.norm.weight], "lr": 1e-3}, {"params": [model.lm_head.weight], "lr": 4e-3}]
    optimizer = torch.optim.SGD(groups)
    train.train(model, token_batches(model), train.TrainConfig(max_steps=4, warmup_steps=0, schedule="linear"),
                optimizer=optimizer, progress=False)  # fmt: skip
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * 0.25, 4e-3 * 0.25])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_steps": 0}, "max_steps must be a whole number of at least 1"),
     ({"max_steps": 2.5}, "max_steps must be a whole number"),
     ({"max_steps": 5, "schedule": "step"}, "Unknown schedule"),
     ({"max_steps": 5, "learning_rate": 0}, "learning_rate must be a positive number"),
     ({"max_steps": 5, "learning_rate": float("nan")}, "learning_rate must be a positive number, got nan"),
     ({"max_steps": 5, "warmup_steps": 5}, r"warmup_steps must be less than max_steps \(5\)"),
     ({"max_steps": 5, "grad_accum_steps": 0}, "grad_accum_steps"),
     ({"max_steps": 5, "mixed_precision": "fp8"}, "Unknown mixed_precision"),
     ({"max_steps": 5, "max_grad_norm": -1}, "max_grad_norm must be positive .* gradient ascent"),
     ({"max_steps": 5, "weight_decay": -0.1}, "weight_decay must be 0 or more"),
     ({"max_steps": 5, "eval_every": -2}, "eval_every must be a whole number of at least 1"),
     ({}, "Give exactly one of max_steps .* and epochs"), ({"max_steps": 5, "epochs": 1}, "Give exactly one"),
     ({"epochs": 0}, "epochs must be a positive number")],
)  # fmt: skip
def test_bad_config_is_refused_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**kwargs)


def test_nothing_to_train_is_an_error():
    model = models.tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train(model, token_batches(model), train.TrainConfig(max_steps=1), progress=False)


def test_mixed_precision_only_on_cuda():
    assert train.autocast_dtype(train.TrainConfig(max_steps=1), torch.device("cpu")) is None


def test_classification_metrics_on_known_predictions(monkeypatch):
    predicted, expected = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0])
    monkeypatch.setattr(train, "predict_classes", lambda model, loader: (predicted, expected))
    metrics = train.classification_metrics(None, None)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * 1 * 0.5 / 1.5, 2 * (2 / 3) * 1 / (5 / 3)]  # per class: P, R from the table
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_answering_the_majority_class_scores_its_share_and_a_low_macro_f1():
    expected = torch.tensor([2] * 7 + [0, 1, 1])  # 70 % of one class, as notebook 10's validation tweets
    metrics = train.metrics_of_predictions(torch.full_like(expected, 2), expected)
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["macro_f1"] == pytest.approx((2 * 0.7 * 1 / 1.7) / 3)  # F1 of the majority class, 0 for the others


def test_every_run_shuffles_a_shared_loader_from_its_first_state():
    """Two runs given one seeded loader train on the same batches in the same order (they used to continue the
    shuffle where the last run stopped, so methods compared on one loader saw different data)."""

    class Pad:
        pad_token_id = 0

    features = [{"input_ids": [5 + i] * 4, "attention_mask": [1] * 4, "labels": i % 2} for i in range(8)]
    loader = data.make_loader(features, Pad, batch_size=2, shuffle=True, seed=3)
    runs = []
    for _ in range(2):
        seen = []
        model = models.tiny_model("bert", task="classification", num_labels=2)
        model.bert.embeddings.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append(kwargs["input_ids"][:, 0].tolist()), with_kwargs=True
        )
        train.train(model, loader, train.TrainConfig(max_steps=4, learning_rate=1e-3), progress=False)
        runs.append(seen)
    assert runs[0] == runs[1] and len(runs[0]) == 4
    assert runs[0] != [[5, 6], [7, 8], [9, 10], [11, 12]]  # shuffled, not in file order


def test_classification_training_beats_chance_on_a_separable_task():
    model = models.tiny_model("bert", task="classification", num_labels=2)
    features = [{"input_ids": [5 + label] * 6, "attention_mask": [1] * 6, "labels": label} for label in (0, 1)] * 8

    class Pad:
        pad_token_id = 0

    loader = data.make_loader(features, Pad, batch_size=4, shuffle=True)
    history = train.train(model, loader, train.TrainConfig(max_steps=30, learning_rate=3e-3),
                          evaluate=lambda m: train.classification_metrics(m, loader), progress=False)  # fmt: skip
    assert history.final["accuracy"] == 1.0
    assert train.mean_loss(model, loader) < history.losses[0]


def test_a_loss_hook_replaces_the_loss_logs_its_metrics_and_a_step_hook_runs_after_each_step():
    model = models.tiny_model("llama")
    steps = []
    config = train.TrainConfig(max_steps=3, learning_rate=1e-3, schedule="constant")
    plain = train.train(models.tiny_model("llama"), token_batches(model), config, progress=False)

    def loss_fn(m, batch):
        task = m(**batch).loss
        penalty = m.lm_head.weight.pow(2).sum()
        return task + 100 * penalty, {"task_loss": task.item(), "penalty": penalty.item()}

    hooked = train.train(model, token_batches(model), config, loss_fn=loss_fn,
                         after_step=lambda m, step: steps.append((step, m.lm_head.weight.grad is not None)),
                         progress=False)  # fmt: skip
    assert steps == [(1, True), (2, True), (3, True)]  # after the optimizer step, gradients still there
    assert hooked.metrics["task_loss"][0] == pytest.approx(plain.losses[0])  # the same start
    assert hooked.losses[0] == pytest.approx(plain.losses[0] + 100 * hooked.metrics["penalty"][0])
    assert hooked.metrics["task_loss"][-1] != pytest.approx(plain.losses[-1])  # the penalty changed the training


# ----------------------------------------------------------------------------------------------------------------
# Hard to break: empty data, bad batches, interruptions, resuming, a reused optimizer
# ----------------------------------------------------------------------------------------------------------------
def test_an_empty_loader_is_an_error_at_once_not_an_endless_loop():
    model = models.tiny_model("llama")
    with pytest.raises(ValueError, match="The loader gave no batch: the data set is empty"):
        train.train(model, [], train.TrainConfig(max_steps=3), progress=False)
    empty = data.make_loader([], tokenizer=type("T", (), {"pad_token_id": 0})(), batch_size=2)
    with pytest.raises(ValueError, match="epochs=1 of 0 batches is 0 steps"):
        train.train(model, empty, train.TrainConfig(epochs=1), progress=False)


def test_the_first_batch_is_checked_in_peftlabs_words():
    model = models.tiny_model("llama")
    (batch,) = token_batches(model)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match=r"The batch has no 'labels' .* Tokenise with peftlab.data"):
        train.train(model, [no_labels], train.TrainConfig(max_steps=1), progress=False)
    with pytest.raises(TypeError, match=r"'input_ids' is a list, not a tensor: build loaders with .*make_loader"):
        train.train(model, [{**batch, "input_ids": [1, 2, 3]}], train.TrainConfig(max_steps=1), progress=False)
    frozen = models.tiny_model("llama")
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train(frozen, [batch], train.TrainConfig(max_steps=1), progress=False)
    classifier = models.tiny_model("bert", task="classification")  # 3 classes
    too_high = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": torch.tensor(
        [0, 1, 5, 2])}  # fmt: skip
    with pytest.raises(ValueError, match=r"A label is 5, but the model has 3 classes"):
        train.train(classifier, [too_high], train.TrainConfig(max_steps=1), progress=False)
    negative = {**too_high, "labels": torch.tensor([0, -1, 2, -100])}  # -100 is ignored by the loss; -1 is a bug
    with pytest.raises(ValueError, match=r"A label is -1: class labels run from 0"):
        train.train(classifier, [negative], train.TrainConfig(max_steps=1), progress=False)
    ignored = {**too_high, "labels": torch.tensor([0, -100, 2, 1])}
    assert train.train(classifier, [ignored], train.TrainConfig(max_steps=1), progress=False).steps


def test_a_merged_lora_has_no_gradient_and_is_refused_before_any_step():
    from peftlab.methods import lora

    model = lora.merge(lora.apply(models.tiny_model("llama"), lora.LoRAConfig(r=2)))
    with pytest.raises(ValueError, match=r"The loss has no gradient: .* Is LoRA merged"):
        train.train(model, token_batches(model), train.TrainConfig(max_steps=2), progress=False)


def test_bf16_on_a_cpu_is_refused():
    model = models.tiny_model("llama")
    with pytest.raises(ValueError, match="mixed_precision='bf16' is mixed precision on a CUDA GPU, but this run is on"):
        train.train(model, token_batches(model), train.TrainConfig(max_steps=1, mixed_precision="bf16"),
                    progress=False)  # fmt: skip


def test_epochs_count_the_steps_from_the_loader():
    model = models.tiny_model("llama")
    batches = token_batches(model) * 5
    history = train.train(model, batches, train.TrainConfig(epochs=1.5, grad_accum_steps=2), progress=False)
    assert history.steps == [1, 2, 3, 4]  # ceil(1.5 × 5 / 2)


def test_an_interrupted_run_keeps_its_history_and_leaves_no_stale_gradients():
    model = models.tiny_model("llama")

    def interrupt(m, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(train.TrainingInterrupted) as caught:
        train.train(model, token_batches(model), train.TrainConfig(max_steps=10), after_step=interrupt,
                    progress=False)  # fmt: skip
    assert caught.value.history.steps == [1, 2] and caught.value.history.interrupted_at == 2
    assert not model.training and all(p.grad is None for p in model.parameters())

    def fails(m, step):
        if step == 2:
            raise RuntimeError("a broken hook")

    with pytest.raises(RuntimeError, match="a broken hook") as caught:
        train.train(model, token_batches(model), train.TrainConfig(max_steps=10), after_step=fails, progress=False)
    assert caught.value.history.steps == [1] and all(p.grad is None for p in model.parameters())


def test_a_reused_optimizer_starts_its_second_run_from_its_own_rate():
    model = models.tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = train.TrainConfig(max_steps=4, learning_rate=1e-3, schedule="linear")
    first = train.train(model, token_batches(model), config, optimizer=optimizer, progress=False)
    second = train.train(model, token_batches(model), config, optimizer=optimizer, progress=False)
    assert second.learning_rates == pytest.approx(first.learning_rates)  # not 1e-3 × 0.25 × ...


def test_resuming_from_a_checkpoint_continues_bit_for_bit(tmp_path):
    """Six steps in one go, and three, an interruption, then three more from the checkpoint: the same weights and
    losses exactly (a shuffled loader replays its order; no dropout in the tiny model)."""
    features = [{"input_ids": list(range(3 + i, 11 + i)), "attention_mask": [1] * 8, "labels": list(range(3 + i,
                11 + i))} for i in range(12)]  # fmt: skip
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0})()
    config = train.TrainConfig(max_steps=6, learning_rate=1e-2, warmup_steps=1)

    whole = models.tiny_model("llama")
    straight = train.train(whole, data.make_loader(features, tokenizer, 4, shuffle=True, seed=3), config,
                           progress=False)  # fmt: skip

    def stop_after_four(m, step):
        if step == 4:
            raise KeyboardInterrupt

    first = models.tiny_model("llama")
    with pytest.raises(train.TrainingInterrupted):
        train.train(first, data.make_loader(features, tokenizer, 4, shuffle=True, seed=3), config,
                    after_step=stop_after_four, checkpoint_every=3, checkpoint_dir=tmp_path,
                    progress=False)  # fmt: skip
    resumed_model = models.tiny_model("llama")
    resumed = train.train(resumed_model, data.make_loader(features, tokenizer, 4, shuffle=True, seed=3), config,
                          resume_from=tmp_path, progress=False)  # fmt: skip
    assert resumed.losses == straight.losses and resumed.steps == straight.steps
    for a, b in zip(whole.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at .*resume_from names the file"):
        train.train(models.tiny_model("llama"), [features], config, resume_from=tmp_path / "none", progress=False)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint_dir"):
        train.train(models.tiny_model("llama"), [features], config, checkpoint_every=2, progress=False)
