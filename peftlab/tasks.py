"""The workbook's common experiments, set up once: the data, the loaders, a fresh model, evaluation, a fine-tune.

:class:`SentimentTask` is the experiment of notebooks 01, 08 and 09 (and every later encoder notebook): three-class
financial sentiment (bearish 利空, bullish 利好, neutral 中性) with the MiniLM-L6 encoder and a new classification
head. What it computes:

* **data by profile** — the smoke profile reads the workbook's own teaching headlines (``fin_headlines``: 240
  English train rows, 60 validation rows, shipped in ``data/``), the full profile the public financial tweets
  (``fin_tweets``: 9,543 train, 2,388 validation, read from ``$PEFTLAB_DATA_DIR``), English rows only;
* **tokenised features** (at most ``max_length`` = 64 tokens) and loaders: a validation loader of 128 rows a batch
  in file order, and a training loader of ``batch_size`` rows (16 in smoke, 32 in full) shuffled by a generator
  seeded with the run's seed, so that every run sees the same batches in the same order;
* :meth:`~SentimentTask.fresh_model` — the global seeds set, then the pretrained encoder with a new 3-class head:
  every method starts from the same weights, and the method applied next draws the same random numbers;
* :meth:`~SentimentTask.evaluate` — accuracy and macro-F1 on the validation set
  (:func:`peftlab.train.classification_metrics`);
* :meth:`~SentimentTask.fine_tune` — :func:`peftlab.train.train` with AdamW, a linear warm-up over the first tenth
  of the steps and linear decay, validation metrics at the end (and every ``eval_every`` steps); the
  :class:`~peftlab.train.History` it returns holds the losses, the evaluations and, in ``history.final``, the last
  accuracy and macro-F1.

A notebook applies the method itself, between :meth:`~SentimentTask.fresh_model` and
:meth:`~SentimentTask.fine_tune`, because that is what it teaches::

    task = SentimentTask(run)
    model = lora.apply(task.fresh_model(), lora.LoRAConfig(...))
    history = task.fine_tune(model, steps=900, learning_rate=1e-3)
    history.final  # {"step": 900, "accuracy": ..., "macro_f1": ...}
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peftlab import data, env, models, train

#: The data set each profile trains on.
DATASETS = {"smoke": "fin_headlines", "full": "fin_tweets"}
#: The classes the task predicts, by label index (bearish 利空, bullish 利好, neutral 中性), as its data sets name them.
LABELS = ("bearish", "bullish", "neutral")


class SentimentTask:
    """Financial sentiment with MiniLM: data, loaders, a fresh model, evaluation, a fine-tune (module docstring).

    ``run`` is what :func:`peftlab.env.setup` returned (profile, device, seed). ``dataset`` defaults to the profile's
    (:data:`DATASETS`); any classification set with the sentiment labels works. ``encoder`` is an offline alias,
    a folder or a Hub id (default: MiniLM-L6). The data are read and tokenised when the task is made, so that a
    bad choice fails at once, with what to change.
    """

    def __init__(
        self,
        run: env.Run,
        *,
        dataset: str | None = None,
        languages: tuple[str, ...] = ("en",),
        max_length: int = 64,
        batch_size: int | None = None,
        eval_batch_size: int = 128,
        encoder: str | None = None,
    ):
        if not isinstance(run, env.Run):
            raise TypeError(f"SentimentTask takes the Run that env.setup() returns, got {type(run).__name__}.")
        for name, value in (("max_length", max_length), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}.")
        self.run = run
        self.dataset = dataset if dataset is not None else DATASETS[run.profile]
        _check_sentiment_set(self.dataset)
        self.labels = list(LABELS)
        self.languages = tuple(languages)
        self.max_length = max_length
        self.batch_size = batch_size if batch_size is not None else run.pick(smoke=16, full=32)
        self.encoder = encoder
        self.train_rows = self._rows("train")
        self.val_rows = self._rows("validation")
        _, self.tokenizer = models.load_encoder(encoder)
        self.train_features = data.tokenize_classification(self.tokenizer, self.train_rows, max_length=max_length)
        self.val_features = data.tokenize_classification(self.tokenizer, self.val_rows, max_length=max_length)
        self.val_loader = data.make_loader(self.val_features, self.tokenizer, batch_size=eval_batch_size)

    def _rows(self, split: str) -> list[dict]:
        rows = data.load(self.dataset, split, languages=self.languages)
        if not rows:
            raise data.DataError(
                f"{self.dataset} has no {split} rows in the languages {', '.join(self.languages)}: choose languages "
                "the set has (the teaching headlines: en, zh; the tweets: en)."
            )
        return rows

    def __repr__(self) -> str:
        return (f"SentimentTask({self.dataset}: {len(self.train_rows)} train, {len(self.val_rows)} validation; "
                f"batch {self.batch_size}, at most {self.max_length} tokens, seed {self.run.seed})")  # fmt: skip

    def train_loader(self, features: list[dict] | None = None) -> torch.utils.data.DataLoader:
        """The training batches (``features``: the training features, or a subset of them), shuffled by a
        generator seeded with the run's seed: a new loader repeats the same order."""
        features = self.train_features if features is None else features
        if not features:
            raise ValueError("No training features to load: give at least one example.")
        return data.make_loader(features, self.tokenizer, self.batch_size, shuffle=True, seed=self.run.seed)

    def fresh_model(self, seed: int | None = None) -> nn.Module:
        """The pretrained encoder with a new classification head, after seeding Python, NumPy and torch with
        ``seed`` (default: the run's): the head starts the same every time, and so does what is applied next."""
        env.seed_everything(self.run.seed if seed is None else seed)
        return models.load_encoder(self.encoder, labels=self.labels)[0]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy and macro-F1 of ``model`` on the validation set (in eval mode, without gradients)."""
        return train.classification_metrics(model, self.val_loader)

    def fine_tune(
        self,
        model: nn.Module,
        steps: int,
        learning_rate: float,
        *,
        warmup_steps: int | None = None,
        eval_every: int | None = None,
        loader: Iterable[dict] | None = None,
        progress: bool = True,
        description: str = "train",
    ) -> train.History:
        """Train ``model`` (the method already applied) on the run's device for ``steps`` optimizer steps and
        evaluate it: :func:`peftlab.train.train` with a linear warm-up over ``warmup_steps`` (default: a tenth of the
        steps), linear decay, validation metrics every ``eval_every`` steps and at the end. ``loader`` replaces
        :meth:`train_loader` (a sample, or batches watched on their way). What the model's method needs from the
        loop (AdaLoRA's allocator, LoRA+'s optimizer) the loop adds by itself.
        Returns the History: ``history.final`` is the last evaluation (step, accuracy, macro-F1)."""
        config = train.TrainConfig(max_steps=steps, learning_rate=learning_rate,
                                   warmup_steps=steps // 10 if warmup_steps is None else warmup_steps,
                                   eval_every=eval_every)  # fmt: skip
        return train.train(model.to(self.run.device), self.train_loader() if loader is None else loader, config,
                           evaluate=self.evaluate, progress=progress,
                           description=description)  # fmt: skip


def _check_sentiment_set(name: str) -> None:
    """A data set the task can train on: a classification set (an unknown name or another task is refused by
    :func:`peftlab.data.label_names`, with the close names) whose labels are the three sentiment classes."""
    try:
        labels = data.label_names(name)
    except data.DataError as error:
        raise data.DataError(
            f"{error} SentimentTask trains on a sentiment set: {', '.join(sentiment_sets())}."
        ) from None
    if labels != LABELS:
        raise data.DataError(
            f"{name}'s labels are {', '.join(labels)}, not the sentiment classes {', '.join(LABELS)}: SentimentTask "
            f"trains on {', '.join(sentiment_sets())}."
        )


def sentiment_sets() -> list[str]:
    """The data sets whose labels are the three sentiment classes: the teaching headlines and the public tweets."""
    return [name for name in data.dataset_names()
            if data.task_of(name) == "classification" and data.label_names(name) == LABELS]  # fmt: skip
