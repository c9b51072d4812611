"""The estimate of one training step's GPU memory: the settings (:class:`Setup`), the terms, the two phases."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import nn
from transformers import PretrainedConfig

from peftlab import models
from peftlab.families import family_of
from peftlab.memory.activations import (
    DEVICES,
    _base_of,
    activation_bytes_per_layer,
    encoder_saved_bytes,
    kv_cache_bytes,
    logits_bytes,
)
from peftlab.memory.bytes import (
    QUANTISED,
    optimizer_state_bytes,
    optimizer_workspace_bytes,
    parameter_bytes,
    weight_bytes,
)
from peftlab.memory.measure import OPTIMIZERS, check_choice
from peftlab.methods import METHOD_NAMES, apply_method, method, record
from peftlab.params import count_parameters

PRECISIONS = ("fp32", "bf16-mixed", "bf16", *QUANTISED)
ATTENTION = ("sdpa", "eager")
TERMS = ("weights", "gradients", "optimizer_states", "activations", "logits_and_loss", "optimizer_workspace")
#: GPU memory as nvidia-smi reports it (MiB), for "does it fit".
GPUS = {"T4 16 GB": 15_360 * 2**20, "A100 40 GB": 40_960 * 2**20, "A100 80 GB": 81_920 * 2**20,
        "H100 80 GB": 81_559 * 2**20}  # fmt: skip
#: A typical CUDA context (driver, cuBLAS and cuDNN handles, kernels): measured 0.3-0.8 GiB (0.75 on an H100 with
#: torch 2.11); it is not allocated through PyTorch's allocator, so it is shown beside the estimate, never inside it.
CUDA_CONTEXT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Setup:
    """How a model trains, as far as memory is concerned: the estimator's settings, checked once.

    ``method`` is a registry name (:data:`peftlab.methods.REGISTRY`) and ``method_config`` its config (``None``: the
    family's default). ``precision``: ``fp32``; ``bf16-mixed`` (fp32 weights, bf16 autocast); ``bf16`` (pure bf16);
    ``int8``, ``nf4``, ``nf4-dq`` (a quantised frozen base, bf16 compute, as in QLoRA). ``device`` says whose
    attention kernels are modelled (``cuda``, or ``cpu`` to check the estimate on a CPU).
    """

    method: str = "full"
    method_config: Any = None
    batch_size: int = 1
    seq_len: int = 512
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    device: str = "cuda"

    def __post_init__(self):
        method(self.method)  # an unknown name is refused with the close ones
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("attn_implementation", self.attn_implementation, ATTENTION)
        check_choice("device", self.device, DEVICES)
        for name in ("batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.precision in QUANTISED and not method(self.method).freezes_base:
            frozen = ", ".join(name for name in METHOD_NAMES if method(name).freezes_base)
            raise ValueError(f"A quantised base ({self.precision}) cannot be trained by {self.method!r}: use a "
                             f"method that keeps the base frozen ({frozen}).")  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """Every field but the config: what a results row records."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_config"}


@dataclass
class MemoryEstimate:
    """The estimate: each term in bytes, the two phases, the peak, and the settings it was made for."""

    breakdown: dict[str, int]
    phases: dict[str, dict[str, int]]
    activations_per_layer: list[int]
    saved_bytes: int  # everything saved for backward at the end of the forward pass (what saved_tensor_bytes counts)
    trainable_parameters: int
    total_parameters: int
    setup: Setup
    cuda_context: int = CUDA_CONTEXT_BYTES

    @property
    def peak(self) -> int:
        """Bytes at the peak: the larger of the two phases (what ``max_memory_allocated`` reports)."""
        return max(sum(terms.values()) for terms in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda phase: sum(self.phases[phase].values()))

    def fits(self, gpu: str) -> bool:
        """Whether the peak plus the CUDA context fits in a GPU of ``GPUS``."""
        if gpu not in GPUS:
            raise ValueError(f"Unknown GPU {gpu!r}; known: {', '.join(GPUS)} (or compare .peak with its memory).")
        return self.peak + self.cuda_context <= GPUS[gpu]

    def table(self) -> pd.DataFrame:
        """One row per term, in GiB and as a share of the peak phase."""
        peak_terms = self.phases[self.peak_phase]
        rows = [{"term": term, "GiB": self.breakdown[term] / 2**30, "in peak": term in peak_terms} for term in TERMS]
        rows.append({"term": "peak", "GiB": self.peak / 2**30, "in peak": True})
        rows.append({"term": "CUDA context (beside)", "GiB": self.cuda_context / 2**30, "in peak": False})
        return pd.DataFrame(rows).set_index("term")


def _with_method(model_or_config, setup: Setup) -> nn.Module:
    """The architecture on the meta device with the method applied (a given model is copied, not changed)."""
    if isinstance(model_or_config, str | PretrainedConfig):
        config = models.architecture_config(model_or_config) if isinstance(model_or_config, str) else model_or_config
        task = "classification" if config.model_type == "bert" else "causal_lm"  # encoders train a task head
        model = models.meta_model(config, task=task)
    else:
        model = copy.deepcopy(model_or_config).to("meta")
        model.tie_weights()  # moving a module moves each tied tensor apart: tie them again
    return apply_method(model, setup.method, setup.method_config)


def _check_positions(model: nn.Module, setup: Setup) -> None:
    """A model with a table of learned positions (GPT-2, BERT) cannot run past it; rotary positions have no table."""
    base, queries, keys = _base_of(model)
    limit = getattr(base.config, "max_position_embeddings", None)
    learned = family_of(base.config).positions == "learned"
    if learned and limit is not None and setup.seq_len + queries + keys > limit:
        raise ValueError(
            f"seq_len={setup.seq_len}"
            + (f" + {queries + keys} virtual tokens" if queries + keys else "")
            + f" is past the model's {limit} positions (max_position_embeddings): use a shorter sequence."
        )


def estimate(model_or_config, setup: Setup | None = None, applied: bool = False) -> MemoryEstimate:
    """Estimate the GPU memory of one training step (see the package docstring for the terms).

    ``model_or_config`` is an architecture name (``"llama-3-8b"``), a transformers config, or a model; the method
    is applied for real on the meta device, so the trainable count is exact. ``applied=True`` takes a model that
    already carries ``setup.method`` (the one you are about to train) as it is.
    """
    setup = setup or Setup()
    if not isinstance(setup, Setup):
        raise TypeError(f"estimate takes a memory.Setup, got {type(setup).__name__}: memory.Setup(method=..., ...).")
    if applied:
        carried = record(model_or_config) if isinstance(model_or_config, nn.Module) else None
        if carried is None or carried.method != setup.method:
            have = carried.method if carried else "no method"
            raise ValueError(f"applied=True, but the model carries {have}, not {setup.method!r}: apply it first, or "
                             "pass applied=False to have the estimator apply it to a copy.")  # fmt: skip
        model = model_or_config
    else:
        model = _with_method(model_or_config, setup)
    _check_positions(model, setup)
    counts = count_parameters(model)
    precision, attn, device = setup.precision, setup.attn_implementation, setup.device
    compute_precision = "bf16" if precision in QUANTISED else precision
    per_layer, dims = activation_bytes_per_layer(model, setup.batch_size, setup.seq_len, compute_precision, attn,
                                                 setup.grad_checkpointing, device)  # fmt: skip
    logits = logits_bytes(model, dims, compute_precision, stream_grad=any(per_layer))
    weights = weight_bytes(model, precision)
    gradients = counts.trainable * parameter_bytes(precision)
    states = optimizer_state_bytes(counts.trainable, setup.optimizer, precision)
    workspace = optimizer_workspace_bytes(counts.trainable, setup.optimizer, precision)
    activations = sum(per_layer) + encoder_saved_bytes(model, compute_precision)
    # The short-lived peak on top of the saved tensors: the logits and the KV cache at the end of the forward pass,
    # the logits' gradients at the start of backward, or (with checkpointing) one block recomputed in backward.
    recompute = 0
    if setup.grad_checkpointing:
        recompute = max(activation_bytes_per_layer(model, setup.batch_size, setup.seq_len, compute_precision, attn,
                                                   False, device)[0])  # fmt: skip
    cache = 0 if setup.grad_checkpointing else kv_cache_bytes(model, dims, compute_precision, attn, device)
    transient = max(logits["forward"] + cache, logits["backward"], recompute)
    breakdown = {"weights": weights, "gradients": gradients, "optimizer_states": states,
                 "activations": activations, "logits_and_loss": logits["saved"] + transient,
                 "optimizer_workspace": workspace}  # fmt: skip
    forward_terms = ("weights", "optimizer_states", "activations", "logits_and_loss")
    step_terms = ("weights", "optimizer_states", "gradients", "optimizer_workspace")
    phases = {
        "forward and backward": {term: breakdown[term] for term in forward_terms},
        "optimizer step": {term: breakdown[term] for term in step_terms},
    }
    return MemoryEstimate(breakdown=breakdown, phases=phases, activations_per_layer=per_layer,
                          saved_bytes=sum(per_layer) + encoder_saved_bytes(model, compute_precision) + logits["saved"],
                          trainable_parameters=counts.trainable, total_parameters=counts.total,
                          setup=setup)  # fmt: skip
