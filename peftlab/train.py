"""One small training loop for every notebook: whatever a method returns, this trains it.

``train(model, loader, TrainConfig(...))`` runs ``max_steps`` optimizer steps of AdamW on the parameters that
require gradients, with warm-up and a linear or cosine schedule, gradient accumulation, gradient clipping, mixed
precision on a GPU (bf16 where the GPU has it, else fp16 with loss scaling), periodic evaluation, a progress bar,
and returns a :class:`History`: losses, learning rates, evaluations, seconds per step and peak GPU memory. A run is
``max_steps`` optimizer steps, or ``epochs`` passes over the loader.

The loss is ``model(**batch).loss`` (every transformers model returns it when the batch holds ``labels``), or
whatever ``loss_fn(model, batch) -> (loss, {name: value})`` computes: DPO's objective, AdaLoRA's loss with its
orthogonality term. A method that needs more from the loop (AdaLoRA's rank allocator after every step, LoRA+'s
optimizer) says so in the method registry, and the loop asks it (:func:`peftlab.methods.training_hooks`).

It is hard to break: a bad setting or a first batch the model cannot learn from is refused before the first step,
with what to change; an empty loader is an error, never an endless wait; an interrupted run (Ctrl-C, an error in
a hook) leaves no stale gradients and the model in eval mode, and hands back what it measured
(:class:`TrainingInterrupted` for Ctrl-C; an error carries it as ``error.history``); ``checkpoint_every`` writes
a checkpoint that ``resume_from`` continues from, bit for bit the run that was not interrupted.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.methods.hooks import LossFn

SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
CHECKPOINT_NAME = "checkpoint.pt"


def _whole(value, name: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}.")


@dataclass
class TrainConfig:
    """What the loop does: ``max_steps`` optimizer steps, or ``epochs`` passes over the loader (one of the two);
    every other field has a safe default. Every value is checked here, before anything trains."""

    max_steps: int | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # optimizer steps between evaluations; the end is always evaluated
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, fp16 on one that doesn't, none on a CPU
    epochs: float | None = None  # instead of max_steps: passes over the loader (fractions allowed)

    def __post_init__(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("Give exactly one of max_steps (optimizer steps) and epochs (passes over the data).")
        if self.max_steps is not None:
            _whole(self.max_steps, "max_steps", 1)
        if self.epochs is not None and not (isinstance(self.epochs, int | float) and self.epochs > 0):
            raise ValueError(f"epochs must be a positive number of passes over the data, got {self.epochs!r}.")
        _whole(self.grad_accum_steps, "grad_accum_steps", 1)
        _whole(self.warmup_steps, "warmup_steps", 0)
        if not (isinstance(self.learning_rate, int | float) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):  # fmt: skip
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}.")
        if not (isinstance(self.weight_decay, int | float) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):  # fmt: skip
            raise ValueError(f"weight_decay must be 0 or more, got {self.weight_decay!r}.")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(
                f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm!r}: a negative "
                "norm would flip the gradient and run gradient ascent."
            )
        if self.eval_every is not None:
            _whole(self.eval_every, "eval_every", 1)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"Unknown mixed_precision {self.mixed_precision!r}; use one of {', '.join(MIXED_PRECISION)}."
            )
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps must be less than max_steps ({self.max_steps}), got {self.warmup_steps}.")

    def total_steps(self, loader: Iterable) -> int:
        """The number of optimizer steps: ``max_steps``, or ``epochs`` passes of ``len(loader)`` batches."""
        if self.max_steps is not None:
            return self.max_steps
        if not hasattr(loader, "__len__"):
            raise ValueError("epochs needs a loader with a length (a DataLoader or a list): give max_steps instead.")
        steps = math.ceil(self.epochs * len(loader) / self.grad_accum_steps)
        if steps < 1 or self.warmup_steps >= steps:
            raise ValueError(f"epochs={self.epochs} of {len(loader)} batches is {steps} steps, not enough for "
                             f"warmup_steps={self.warmup_steps}: train longer or warm up less.")  # fmt: skip
        return steps


@dataclass
class History:
    """What a training run measured."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)  # {"step": n, metric: value, ...}
    metrics: dict[str, list[float]] = field(default_factory=dict)  # what loss_fn logged, per step
    step_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    peak_memory_bytes: int | None = None  # max_memory_allocated on CUDA; None on other devices
    device: str = ""
    trainable_parameters: int = 0
    method_state: object = None  # what the method kept while training (AdaLoRA: its RankAllocator)
    interrupted_at: int | None = None  # the optimizer step an interruption stopped (None: the run finished)

    @property
    def seconds_per_step(self) -> float:
        """Median wall time of an optimizer step, the first (warm-up) step left out when there are others."""
        timed = self.step_seconds[1:] or self.step_seconds
        return statistics.median(timed) if timed else float("nan")

    @property
    def final(self) -> dict:
        """The last evaluation (empty when there was none)."""
        return self.evaluations[-1] if self.evaluations else {}

    def plot(self, ax=None, label: str | None = None, smooth: int = 10):
        """The training loss per step, with a moving average over ``smooth`` steps."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(6, 3.5))[1]
        window = max(1, min(smooth, len(self.losses)))
        averaged = [statistics.fmean(self.losses[max(0, i - window + 1) : i + 1]) for i in range(len(self.losses))]
        line = ax.plot(self.steps, averaged, label=label)[0]
        ax.plot(self.steps, self.losses, color=line.get_color(), alpha=0.25, linewidth=0.8)
        ax.set(xlabel="optimizer step", ylabel="training loss")
        if label:
            ax.legend()
        return ax


def learning_rate_factor(step: int, config: TrainConfig, total_steps: int | None = None) -> float:
    """The schedule: linear warm-up to 1, then constant, linear or cosine decay to 0 at the last step."""
    total = total_steps if total_steps is not None else config.max_steps
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.schedule == "linear":
        return 1.0 - progress
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters: apply a method (or unfreeze something) first.")
    return params


def make_adamw(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on matrices (not biases, norms or 1-D vectors)."""
    params = trainable_parameters(model)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype of mixed precision on this device, or ``None`` for full fp32. Asking for bf16 or fp16 where there
    is no CUDA GPU is refused (``auto`` trains in fp32 there)."""
    if device.type != "cuda" and config.mixed_precision in ("bf16", "fp16"):
        raise ValueError(
            f"mixed_precision={config.mixed_precision!r} is mixed precision on a CUDA GPU, but this run is on "
            f"{device.type}: use 'auto' (fp32 here, bf16 or fp16 on a GPU) or 'no'."
        )
    if device.type != "cuda" or config.mixed_precision == "no":
        return None
    if config.mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]


def _forever(loader: Iterable) -> Iterator:
    """The loader's batches again and again; an empty loader is an error at once, not an endless loop."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("The loader gave no batch: the data set is empty (or every row was filtered out).")


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a batch on ``device``; anything else is refused (a list of ids is not a batch)."""
    if not isinstance(batch, dict):
        raise TypeError(f"A batch must be a dict of tensors, got {type(batch).__name__}: build loaders with "
                        "peftlab.data.make_loader.")  # fmt: skip
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"The batch's {key!r} is a {type(value).__name__}, not a tensor: build loaders with "
                            "peftlab.data.make_loader (it pads and stacks the examples).")  # fmt: skip
    return {key: value.to(device) for key, value in batch.items()}


def check_first_batch(model: nn.Module, batch: dict, uses_model_loss: bool) -> None:
    """What the first batch can get wrong, in peftlab's words, before the model sees it."""
    if uses_model_loss and "labels" not in batch:
        raise ValueError(f"The batch has no 'labels' (it has {', '.join(batch)}): the model's loss needs them. "
                         "Tokenise with peftlab.data (it adds labels), or give train a loss_fn.")  # fmt: skip
    labels = batch.get("labels")
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    is_classifier = labels is not None and labels.dim() == 1 and hasattr(model, "config")
    if is_classifier and num_labels and labels.max().item() >= num_labels:
        raise ValueError(f"A label is {labels.max().item()}, but the model has {num_labels} classes (0..."
                         f"{num_labels - 1}): load it with num_labels covering every label.")  # fmt: skip
    negative = labels[(labels < 0) & (labels != -100)] if is_classifier else []
    if len(negative):
        raise ValueError(f"A label is {negative[0].item()}: class labels run from 0 (-100 marks a row the loss "
                         "ignores). Map the data set's label names to 0, 1, ... (peftlab.data does).")  # fmt: skip


def check_first_loss(loss: torch.Tensor) -> None:
    """What the first loss can say is wrong, before the optimizer moves anything."""
    if loss is None or not loss.requires_grad:
        raise ValueError("The loss has no gradient: nothing that trains reaches it. Is LoRA merged (unmerge it), "
                         "or is every parameter frozen?")  # fmt: skip
    if not torch.isfinite(loss):
        raise ValueError(f"The first loss is {loss.item()}: check the data (every label -100?) and the settings.")


def model_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The default ``loss_fn``: the model's own loss, nothing else logged."""
    return model(**batch).loss, {}


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (the notebook's stop button): ``history`` holds the steps it made. (A run stopped by an
    error raises that error, with the partial History as its ``history`` attribute.)"""

    def __init__(self, history: History):
        super().__init__(f"training interrupted after {len(history.steps)} steps; the steps made are in .history")
        self.history = history


def _initial_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's starting rate, kept in the group (as torch's schedulers do) so that a second run with the
    same optimizer starts from it, not from where the first run's schedule left it."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return [group["initial_lr"] for group in optimizer.param_groups]


def _save_checkpoint(path: Path, model: nn.Module, optimizer, scaler, history: History, state: dict) -> None:
    trained = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    checkpoint = {"trained": trained, "optimizer": optimizer.state_dict(), "history": history.__dict__ | {
        "method_state": None}, **state, "torch_rng": torch.get_rng_state(),
                  "scaler": scaler.state_dict() if scaler else None}  # fmt: skip
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    partial.replace(path)  # a checkpoint appears only when complete


def _load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: resume_from names the file (or folder) that "
                                "checkpoint_every wrote.")  # fmt: skip
    return torch.load(path, weights_only=True)  # tensors and plain values only: nothing in it can run code


def train(
    model: nn.Module,
    loader: Iterable[dict],
    config: TrainConfig,
    *,
    evaluate: Callable[[nn.Module], dict] | None = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    description: str = "train",
    checkpoint_every: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> History:
    """Train ``model`` for ``config``'s steps and return what was measured.

    ``evaluate(model) -> {"metric": value}`` runs every ``config.eval_every`` steps and at the end (in eval mode,
    without gradients). ``loss_fn(model, batch) -> (loss, metrics)`` replaces ``model(**batch).loss``; its metrics
    are averaged over the accumulated micro-batches, recorded in ``History.metrics`` and shown on the progress bar.
    ``optimizer`` replaces the default AdamW (e.g. LoRA+ parameter groups); the schedule scales each group's own
    starting rate. ``after_step(model, step)`` runs after each optimizer step, before the gradients are cleared
    (step from 1). What is not given comes from the method the model carries (:func:`peftlab.methods.training_hooks`).

    ``checkpoint_every=N`` writes the trained parameters, the optimizer, the position in the data and the random
    state to ``checkpoint_dir/checkpoint.pt`` every N steps; ``resume_from`` (that file or folder) continues the run
    where it was, exactly: give it the same model (freshly built, the method applied), loader and config. The
    loader is replayed from its start (a loader from ``data.make_loader`` shuffles the same way every time).
    Ctrl-C raises :class:`TrainingInterrupted`, which carries the partial History; any other error is raised as
    it is, with the partial History as ``error.history``.
    """
    from peftlab.methods import training_hooks  # the registry knows what each method needs from the loop

    if checkpoint_every is not None:
        _whole(checkpoint_every, "checkpoint_every", 1)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir: the folder the checkpoint is written to.")
    resumed = _load_checkpoint(resume_from) if resume_from is not None else None
    total = config.total_steps(loader)
    hooks = training_hooks(model, config)
    loss_fn, uses_model_loss = loss_fn or hooks.loss_fn or model_loss, loss_fn is None and hooks.loss_fn is None
    after_step = after_step or hooks.after_step
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = autocast_dtype(config, device)  # refuses bf16 on a CPU before anything moves
    model.to(device)
    optimizer = optimizer or (hooks.optimizer(model) if hooks.optimizer else make_adamw(model, config))
    base_rates = _initial_rates(optimizer)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    params = trainable_parameters(model)
    history = History(device=str(device), trainable_parameters=sum(p.numel() for p in params),
                      method_state=hooks.state)  # fmt: skip
    start, skip = 0, 0
    if resumed is not None:
        trained = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in resumed["trained"].items():
                trained[name].copy_(value)
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler and resumed["scaler"]:
            scaler.load_state_dict(resumed["scaler"])
        for key, value in resumed["history"].items():
            if key != "method_state":
                setattr(history, key, value)
        history.interrupted_at = None
        start, skip = resumed["step"], resumed["batches"]
        torch.set_rng_state(resumed["torch_rng"])
    if getattr(loader, "generator", None) is not None:  # every run shuffles from the loader's first state
        if resumed:
            loader.generator.set_state(resumed["loader_generator"])
        else:  # its seed: two runs on one loader see the same batches (make_loader seeds the generator)
            loader.generator.manual_seed(loader.generator.initial_seed())
        initial_generator = loader.generator.get_state()
    else:
        initial_generator = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run_evaluation(step: int) -> None:
        model.eval()
        with torch.no_grad():
            history.evaluations.append({"step": step, **evaluate(model)})
        model.train()

    batches = _forever(loader)
    for _ in range(skip):
        next(batches)
    consumed = skip
    optimizer.zero_grad(set_to_none=True)  # no stale gradients from an earlier run enter the first step
    model.train()
    started = time.perf_counter()
    bar = tqdm(range(start, total), desc=description, disable=not progress, initial=start, total=total)
    try:
        for step in bar:
            step_started = time.perf_counter()
            factor = learning_rate_factor(step, config, total)
            for group, base in zip(optimizer.param_groups, base_rates, strict=True):
                group["lr"] = base * factor
            loss_sum, logged = 0.0, {}
            for _ in range(config.grad_accum_steps):
                batch = to_device(next(batches), device)
                consumed += 1
                if step == start:
                    check_first_batch(model, batch, uses_model_loss)
                with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                    loss, metrics = loss_fn(model, batch)
                if step == start:
                    check_first_loss(loss)
                loss = loss / config.grad_accum_steps
                loss_sum += loss.item()
                for name, value in metrics.items():
                    logged[name] = logged.get(name, 0.0) + value / config.grad_accum_steps
                (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if after_step is not None:
                after_step(model, step + 1)
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            history.step_seconds.append(time.perf_counter() - step_started)
            history.steps.append(step + 1)
            history.losses.append(loss_sum)
            history.learning_rates.append(optimizer.param_groups[0]["lr"])
            for name, value in logged.items():
                history.metrics.setdefault(name, []).append(value)
            bar.set_postfix(loss=f"{loss_sum:.4f}", **{name: f"{value:.4g}" for name, value in logged.items()})
            if evaluate and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
                run_evaluation(step + 1)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total:
                Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
                _save_checkpoint(
                    Path(checkpoint_dir) / CHECKPOINT_NAME,
                    model,
                    optimizer,
                    scaler,
                    history,
                    {"step": step + 1, "batches": consumed, "loader_generator": initial_generator},
                )
        if evaluate:
            run_evaluation(total)
    except (KeyboardInterrupt, Exception) as error:
        optimizer.zero_grad(set_to_none=True)  # nothing stale enters the next run
        model.eval()
        bar.close()
        history.interrupted_at = len(history.steps)
        if isinstance(error, KeyboardInterrupt):
            raise TrainingInterrupted(history) from error
        error.history = history  # the steps made before the error, for whoever catches it
        raise
    history.total_seconds = time.perf_counter() - started
    if device.type == "cuda":
        history.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_classes(model: nn.Module, loader: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true class of every example of a classification loader."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predicted, expected = [], []
    for batch in loader:
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        predicted.append(model(**batch).logits.argmax(dim=-1).cpu())
        expected.append(labels.cpu())
    model.train(was_training)
    return torch.cat(predicted), torch.cat(expected)


def classification_metrics(model: nn.Module, loader: Iterable[dict]) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model``'s predicted classes on ``loader`` (:func:`metrics_of_predictions`)."""
    return metrics_of_predictions(*predict_classes(model, loader))


def metrics_of_predictions(predicted: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """Accuracy, and macro-F1: the unweighted mean over the expected classes of F1 = 2PR/(P+R), fair to the small
    classes (a model that answers the majority class every time scores its share in accuracy, and a low macro-F1)."""
    f1_scores = []
    for label in expected.unique():
        true_positive = ((predicted == label) & (expected == label)).sum().item()
        precision = true_positive / max(1, (predicted == label).sum().item())
        recall = true_positive / max(1, (expected == label).sum().item())
        f1_scores.append(0.0 if true_positive == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": (predicted == expected).float().mean().item(), "macro_f1": statistics.fmean(f1_scores)}


@torch.no_grad()
def mean_loss(model: nn.Module, loader: Iterable[dict]) -> float:
    """Mean of ``model(**batch).loss`` over a loader (per batch)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = [model(**to_device(batch, device)).loss.item() for batch in loader]
    model.train(was_training)
    return statistics.fmean(losses)
