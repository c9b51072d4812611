"""One small training loop for every notebook: whatever a method returns, this trains it.

``train(model, loader, TrainConfig(...))`` runs ``max_steps`` optimizer steps of AdamW on the parameters that
require gradients, with warm-up and a linear or cosine schedule, gradient accumulation, gradient clipping, mixed
precision on a GPU (bf16 where the GPU has it, else fp16 with loss scaling), periodic evaluation, a progress bar,
and returns a :class:`History`: losses, learning rates, evaluations, seconds per step and peak GPU memory.

The loss is ``model(**batch).loss`` (every transformers model returns it when the batch holds ``labels``), or
whatever ``loss_fn(model, batch) -> (loss, {name: value})`` computes: DPO's objective, AdaLoRA's loss with its
orthogonality term. A method that needs more from the loop (AdaLoRA's rank allocator after every step, LoRA+'s
optimizer) says so in the method registry, and the loop asks it (:func:`peftlab.methods.training_hooks`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.methods.hooks import LossFn

SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")


@dataclass
class TrainConfig:
    """What the loop does; every field has a safe default except the number of optimizer steps."""

    max_steps: int
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # optimizer steps between evaluations; the end is always evaluated
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, fp16 on one that doesn't, none on a CPU

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}.")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be at least 1, got {self.grad_accum_steps}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"Unknown mixed_precision {self.mixed_precision!r}; use one of {', '.join(MIXED_PRECISION)}."
            )
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps), got {self.warmup_steps}.")


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


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """The schedule: linear warm-up to 1, then constant, linear or cosine decay to 0 at ``max_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
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
    """The dtype of mixed precision on this device, or ``None`` for full fp32."""
    if device.type != "cuda" or config.mixed_precision == "no":
        return None
    if config.mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]


def _forever(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def model_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The default ``loss_fn``: the model's own loss, nothing else logged."""
    return model(**batch).loss, {}


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
) -> History:
    """Train ``model`` for ``config.max_steps`` optimizer steps and return what was measured.

    ``evaluate(model) -> {"metric": value}`` runs every ``config.eval_every`` steps and at the end (in eval mode,
    without gradients). ``loss_fn(model, batch) -> (loss, metrics)`` replaces ``model(**batch).loss``; its metrics
    are averaged over the accumulated micro-batches, recorded in ``History.metrics`` and shown on the progress bar.
    ``optimizer`` replaces the default AdamW (e.g. LoRA+ parameter groups); the schedule scales each group's own
    learning rate. ``after_step(model, step)`` runs after each optimizer step, before the gradients are cleared
    (step from 1). What is not given comes from the method the model carries (:func:`peftlab.methods.training_hooks`).
    """
    from peftlab.methods import training_hooks  # the registry knows what each method needs from the loop

    hooks = training_hooks(model, config)
    loss_fn = loss_fn or hooks.loss_fn or model_loss
    after_step = after_step or hooks.after_step
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    optimizer = optimizer or (hooks.optimizer(model) if hooks.optimizer else make_adamw(model, config))
    base_rates = [group["lr"] for group in optimizer.param_groups]
    dtype = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    params = trainable_parameters(model)
    history = History(device=str(device), trainable_parameters=sum(p.numel() for p in params),
                      method_state=hooks.state)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run_evaluation(step: int) -> None:
        model.eval()
        with torch.no_grad():
            history.evaluations.append({"step": step, **evaluate(model)})
        model.train()

    batches = _forever(loader)
    model.train()
    started = time.perf_counter()
    bar = tqdm(range(config.max_steps), desc=description, disable=not progress)
    for step in bar:
        step_started = time.perf_counter()
        factor = learning_rate_factor(step, config)
        for group, base in zip(optimizer.param_groups, base_rates, strict=True):
            group["lr"] = base * factor
        loss_sum, logged = 0.0, {}
        for _ in range(config.grad_accum_steps):
            batch = to_device(next(batches), device)
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                loss, metrics = loss_fn(model, batch)
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
        if evaluate and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps:
            run_evaluation(step + 1)
    if evaluate:
        run_evaluation(config.max_steps)
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
    """Accuracy, and macro-F1: the unweighted mean over classes of F1 = 2PR/(P+R), fair to the small classes."""
    predicted, expected = predict_classes(model, loader)
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
