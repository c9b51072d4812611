"""ZeRO data parallelism: what each of N GPUs holds.

Two views of the same idea (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models"): stage 1 splits the optimizer states over the N GPUs, stage 2 also the gradients, stage 3 also the weights.

* :func:`zero_model_states` counts the model states as the paper and DeepSpeed lay them out for mixed-precision
  Adam: 16-bit weights and gradients on every GPU, and the fp32 master copy *inside* the optimizer states.
* :func:`zero_per_gpu` splits one of peftlab's estimates, term by term, in whatever layout the estimate has (torch
  AMP's ``bf16-mixed`` keeps fp32 weights and fp32 gradients and no separate master copy), with its activations.

The two differ for the same model because the layouts differ, not the partitioning: under AMP a replicated weight
costs 4 bytes per parameter on every GPU, in the paper's layout 2.
"""

from __future__ import annotations

import math

from torch import nn

from peftlab.memory.estimate import MemoryEstimate

#: The paper's K: bytes per parameter of mixed-precision Adam's optimizer state (fp32 master weights, momentum and
#: variance, 4 bytes each).
ADAM_MIXED_STATE_BYTES = 12
#: ``paper``: the paper's count. ``deepspeed``: DeepSpeed's own estimators for stages 2 and 3
#: (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``, nothing offloaded), which
#: also keep an fp32 copy of the gradients.
LAYOUTS = ("paper", "deepspeed")


def zero_model_states(
    parameters: int, num_gpus: int, stage: int, layout: str = "paper", largest_layer_parameters: int = 0
) -> dict[str, int]:
    """Bytes per GPU of the model states of mixed-precision Adam under ZeRO, for Ψ = ``parameters`` and N GPUs.

    ``paper`` (§3 and Figure 1): 16-bit weights (2Ψ), 16-bit gradients (2Ψ), optimizer states KΨ with K = 12:

        stage 0: 2Ψ + 2Ψ + KΨ          stage 1: 2Ψ + 2Ψ + KΨ/N
        stage 2: 2Ψ + (2 + K)Ψ/N       stage 3: (2 + 2 + K)Ψ/N

    (Figure 1's 7.5B model on 64 GPUs: 120, 31.4, 16.6 and 1.9 GB.) ``deepspeed``, as DeepSpeed 0.19 estimates a
    run with nothing offloaded: stage 2 2Ψ + 18Ψ/N, where 18 = 16-bit gradients 2 + fp32 gradients 4 + fp32
    weights 4 + momentum and variance 8; stage 3 18Ψ/N + 4 bytes per parameter of the largest layer
    (``largest_layer_parameters``: the one module gathered whole at a time). DeepSpeed estimates no other stage
    (``benchmarks/zero_deepspeed.py`` records its numbers; the tests hold this function to them).

    Returns ``weights``, ``gradients``, ``optimizer_states`` and their ``total``; the deepspeed layout gives the
    ``total`` only, split no further, as its estimators do.
    """
    if isinstance(parameters, bool) or not isinstance(parameters, int) or parameters < 1:
        raise ValueError(f"parameters must be a whole number of at least 1, got {parameters!r}.")
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a whole number of at least 1, got {num_gpus!r}.")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}.")
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}.")
    psi, n = parameters, num_gpus
    if layout == "deepspeed":
        if stage < 2:
            raise ValueError(f"DeepSpeed estimates stages 2 and 3 only; use layout='paper' for stage {stage}.")
        if stage == 3:
            return {"total": 4 * largest_layer_parameters + int(18 * psi / n)}
        return {"total": 2 * psi + int(18 * psi / n)}
    k = ADAM_MIXED_STATE_BYTES
    terms = {
        "weights": 2 * psi if stage < 3 else math.ceil(2 * psi / n),
        "gradients": 2 * psi if stage < 2 else math.ceil(2 * psi / n),
        "optimizer_states": k * psi if stage < 1 else math.ceil(k * psi / n),
    }
    return {**terms, "total": sum(terms.values())}


def largest_layer_parameters(model: nn.Module) -> int:
    """The parameters of the largest module counted by its own tensors (not its children's): what ZeRO stage 3
    gathers whole at one time, as DeepSpeed's ``model_to_params`` counts it (for a Llama, the embedding)."""
    return max((sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()), default=0)


def zero_per_gpu(estimate: MemoryEstimate, num_gpus: int, stage: int) -> dict[str, int]:
    """Bytes per GPU when ZeRO splits one of peftlab's estimates, in the estimate's own layout (for ``bf16-mixed``,
    torch AMP's: fp32 weights and gradients): stage 1 splits the optimizer states (and the optimizer's
    temporaries) over the N GPUs, stage 2 also the gradients, stage 3 also the weights. Activations are not split:
    each GPU keeps those of its own micro-batch. Returns each term and the peak (the same two phases as
    :func:`~peftlab.memory.estimate`). For the paper's layout of the model states, see :func:`zero_model_states`."""
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
