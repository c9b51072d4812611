"""ZeRO data parallelism: how an estimate splits over N GPUs."""

from __future__ import annotations

import math

from peftlab.memory.estimate import MemoryEstimate


def zero_per_gpu(estimate: MemoryEstimate, num_gpus: int, stage: int) -> dict[str, int]:
    """Bytes per GPU under ZeRO data parallelism (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward
    Training Trillion Parameter Models"): stage 1 splits the optimizer states over the N GPUs, stage 2 also the
    gradients, stage 3 also the weights. Activations are not split: each GPU keeps those of its own micro-batch.
    Returns each term and the peak (the same two phases as :func:`estimate`)."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}.")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}.")
    split = {"optimizer_states": stage >= 1, "optimizer_workspace": stage >= 1, "gradients": stage >= 2,
             "weights": stage >= 3}  # fmt: skip
    terms = {
        term: math.ceil(value / num_gpus) if split.get(term) else value for term, value in estimate.breakdown.items()
    }
    phases = [sum(terms[term] for term in phase) for phase in estimate.phases.values()]
    return {**terms, "peak": max(phases)}
