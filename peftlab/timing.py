"""The one step timer: a training step timed with the device synchronised around it, two sides timed in
alternating blocks (so drift falls on both), models' forward passes taken in turn with their paired slowdown
against a base, and the GPU's own dense bf16 matmul throughput, the ceiling a step is held against. The notebooks
and the benchmarks time with it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[int], None], device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step(index)`` after ``warmup`` untimed ones, the device synchronised
    before and after each call (so a step's time is its own, launch gaps included)."""
    times = []
    for index in range(warmup + steps):
        synchronize(device)
        started = time.perf_counter()
        step(index)
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def training_step(model: torch.nn.Module, batch: dict, autocast: bool = True, loss_fn=None,
                  after_step=None) -> Callable[[int], None]:  # fmt: skip
    """One full training step as a function of the step index, for :func:`timed_steps`: forward (bf16 autocast on
    CUDA when ``autocast``), backward, an AdamW step over what trains, gradients cleared. ``loss_fn(model, batch)``
    replaces ``model(**batch).loss``; ``after_step(step)`` runs after the optimizer step (step from 1)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = next(model.parameters()).device
    enabled = autocast and device.type == "cuda"

    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(index + 1)
        optimizer.zero_grad(set_to_none=True)

    return step


def alternate(sides: dict[str, Callable[[], list[float]]], rounds: int = 3) -> dict[str, list[float]]:
    """Call each side's block ``rounds`` times, side after side, so that clock and thermal drift fall on every
    side; returns each side's step times, all blocks together."""
    timed: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, block in sides.items():
            timed[name] += block()
    return timed


def forward_latency(
    models: dict[str, torch.nn.Module], batch: dict, device: torch.device, rounds: int, base: str = "base"
) -> dict[str, float]:
    """Each model's forward pass on ``batch`` (no gradients), one warm-up pass each, then one pass per model in
    turn for ``rounds`` rounds (so drift falls on all): ``{label}_ms``, the median in ms, and for every model but
    ``base`` ``{label}_slowdown``, the median over the rounds of the paired ratio model / base, minus 1 (a shared
    machine's swings cancel in a pair of neighbouring passes, not in two medians)."""

    def passes(model: torch.nn.Module, steps: int, warmup: int) -> list[float]:
        with torch.no_grad():
            return timed_steps(lambda _: model(**batch), device, steps, warmup)

    for model in models.values():
        passes(model, steps=0, warmup=1)
    timed = alternate({label: lambda m=model: passes(m, steps=1, warmup=0) for label, model in models.items()},
                      rounds)  # fmt: skip
    row = {f"{label}_ms": 1e3 * median(times) for label, times in timed.items()}
    for label, times in timed.items():
        if label != base:
            row[f"{label}_slowdown"] = median([a / b for a, b in zip(times, timed[base], strict=True)]) - 1
    return row


def median(times: list[float]) -> float:
    return statistics.median(times)


def quartiles(times: list[float]) -> tuple[float, float]:
    """The first and third quartiles of the step times: the middle half of the timings lies between them, so two
    rows whose ranges overlap are not told apart by this run."""
    first, _, third = statistics.quantiles(times, n=4, method="inclusive")
    return first, third


def matmul_tflops(device: torch.device, n: int = 8192, warmup: int = 3, repeats: int = 10) -> dict:
    """Measured dense bf16 matmul throughput: an n × n × n product on random data (never zeros: they run faster),
    timed with CUDA events, the mean of ``repeats`` after ``warmup``. Returns TFLOP/s and how it was measured."""
    if device.type != "cuda":
        return {"tflops": None, "note": "not measured: no CUDA device"}
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    for _ in range(warmup):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return {
        "tflops": 2 * n**3 / seconds / 1e12,
        "n": n,
        "dtype": "bf16",
        "repeats": repeats,
        "warmup": warmup,
        "note": f"{n}x{n}x{n} bf16 torch.matmul on random data, CUDA events, mean of {repeats} after {warmup}",
    }
