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
    LOSSES,
    _base_of,
    activation_bytes_per_layer,
    embedding_dropout_bytes,
    encoder_saved_bytes,
    kv_cache_bytes,
    logits_bytes,
)
from peftlab.memory.bytes import (
    QUANTISED,
    QUANTISED_LAYERS,
    optimizer_state_bytes,
    optimizer_workspace_bytes,
    parameter_bytes,
    weight_bytes,
)
from peftlab.memory.measure import OPTIMIZERS, check_choice
from peftlab.methods import METHOD_NAMES, apply_method, method, record
from peftlab.methods.layers import AdapterLayer
from peftlab.params import count_parameters

PRECISIONS = ("fp32", "bf16-mixed", "bf16", *QUANTISED)
ATTENTION = ("sdpa", "eager")
TERMS = (
    "weights",
    "gradients",
    "optimizer_states",
    "activations",
    "logits_and_loss",
    "optimizer_workspace",
    "cublas_workspace",
)
#: DPO's (``Setup.preference``) reference choices: ``"shared"``, the policy's own frozen weights with its adapters
#: switched off (``methods.disabled``, as ``align.dpo_loss_fn`` does), or ``"copy"``, a second full copy of the base.
PREFERENCES = ("shared", "copy")
#: The terms only a preference setup has, after :data:`TERMS` in a table.
PREFERENCE_TERMS = ("reference_weights",)
#: GPU memory as nvidia-smi reports it (MiB), for "does it fit".
GPUS = {"T4 16 GB": 15_360 * 2**20, "A100 40 GB": 40_960 * 2**20, "A100 80 GB": 81_920 * 2**20,
        "H100 80 GB": 81_559 * 2**20}  # fmt: skip
#: A typical CUDA context (driver, cuBLAS and cuDNN handles, kernels), 0.75 GiB: a fresh process alone on an H200
#: with torch 2.11 held 0.67-0.69 GiB beside what PyTorch reserved (benchmarks/results/memory_accuracy.json,
#: first_reading.cuda_context_alone), an H100 0.75 GiB. It is not allocated through PyTorch's allocator, so it is
#: shown beside the estimate, never inside it.
CUDA_CONTEXT_BYTES = 768 * 2**20
#: cuBLAS's workspace per handle and stream, PyTorch's default (``CUBLAS_WORKSPACE_CONFIG`` unset; ``parse
#: ChosenWorkspaceSize`` in ATen's CublasHandlePool.cpp): 32 MiB on Hopper (sm90), ``:4096:2:16:8`` = 8 MiB + 128 KiB
#: before it. ``Setup.gpu`` names the GPU; cuBLASLt shares the same workspace (``TORCH_CUBLASLT_UNIFIED_WORKSPACE``
#: is on by default).
CUBLAS_WORKSPACE_BYTES = {"T4": 4096 * 1024 * 2 + 16 * 1024 * 8, "A100": 4096 * 1024 * 2 + 16 * 1024 * 8,
                          "L4": 4096 * 1024 * 2 + 16 * 1024 * 8, "H100": 4096 * 8 * 1024,
                          "H200": 4096 * 8 * 1024}  # fmt: skip
#: Threads that run matmuls in a step, each with its own cuBLAS handle (a thread-local pool) and so its own
#: workspace: the Python thread (forward) and autograd's CUDA device thread (backward).
CUBLAS_HANDLES = 2


@dataclass(frozen=True)
class Setup:
    """How a model trains, as far as memory is concerned: the estimator's settings, checked once.

    ``method`` is a registry name (:data:`peftlab.methods.REGISTRY`) and ``method_config`` its config (``None``: the
    family's default). ``precision``: ``fp32``; ``bf16-mixed`` (fp32 weights, bf16 autocast); ``bf16`` (pure bf16);
    ``int8``, ``nf4``, ``nf4-dq`` (a quantised frozen base, bf16 compute, as in QLoRA). ``device`` says whose
    attention kernels are modelled (``cuda``, or ``cpu`` to check the estimate on a CPU).

    The mechanisms beyond one plain step, each off by default (the estimate is then what it was without them):

    * ``grad_accum_steps``: micro-batches per optimizer step. From the second on, the gradients of the earlier ones
      are alive through the forward and backward pass, so that phase holds them too.
    * ``padding``: the share of padded tokens in a batch, in [0, 1). Any padding makes transformers pass an explicit
      attention mask, which changes the kernel (as a prefix does: ``activations._attention``); how much padding does
      not matter, since padded positions are computed like any other.
    * ``loss``: ``"transformers"`` (its ``ForCausalLMLoss``, an fp32 copy of the logits), ``"bf16"``
      (cross-entropy on 16-bit logits, pure bf16 or a quantised base) or ``"chunked"`` (head and loss per chunk of
      ``loss_chunk_tokens`` tokens under activation checkpointing): ``activations.logits_bytes``.
    * ``quantised_layers`` (a quantised base only): ``"blocks"``, every frozen linear layer of the blocks
      (bitsandbytes' ``load_in_4bit``), or ``"targets"``, only the layers the method adapts (peftlab's
      ``qlora.apply``); ``quantise_head``: the output head too (frozen and untied only).
    * ``gpu``: the GPU (a key of :data:`CUBLAS_WORKSPACE_BYTES`), for what PyTorch allocates per GPU kind: two
      cuBLAS workspaces (2 × 32 MiB on an H100 or H200), allocated through the caching allocator on the first
      matmul of each thread and kept, so they are in ``max_memory_allocated`` in every phase. Measured on an H200:
      the optimizer-step peak of a Llama-3.2-1B full row is 64 MiB + 9.5 kB above the sum of weights, gradients,
      AdamW states and AdamW's square-root copy; every Llama row of both readings is 64-75 MiB under without it.
    * ``preference``: a DPO step (Rafailov et al., 2023; ``peftlab.align``), ``batch_size`` counting *pairs*. A
      batch of B pairs is 2B sequences (the B chosen, then the B rejected), so the policy's forward with gradients
      saves the activations and logits of 2B sequences; the reference's forward runs under ``no_grad`` on the same
      2B sequences, saves nothing, and its short-lived logits are those of the policy's forward, whose peak they
      do not pass (they come after the policy's own have been reduced to log-probabilities). ``"shared"``: the
      reference is the policy with its adapters switched off, so it adds no bytes at all (a method that trains
      the base has no adapters to switch off: it is refused). ``"copy"``: a second, frozen copy of the whole base
      model in the same storage precision, ``reference_weights``, held in both phases. ``None``: not DPO.
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
    grad_accum_steps: int = 1
    padding: float = 0.0
    loss: str = "transformers"
    loss_chunk_tokens: int = 1024
    quantised_layers: str = "blocks"
    quantise_head: bool = False
    gpu: str | None = None
    preference: str | None = None

    def __post_init__(self):
        method(self.method)  # an unknown name is refused with the close ones
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("attn_implementation", self.attn_implementation, ATTENTION)
        check_choice("device", self.device, DEVICES)
        for name in ("batch_size", "seq_len", "grad_accum_steps", "loss_chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                hint = " (1: no accumulation)" if name == "grad_accum_steps" else ""
                raise ValueError(f"{name} must be a positive integer{hint}, got {value!r}.")
        if isinstance(self.padding, bool) or not isinstance(self.padding, int | float) or not 0 <= self.padding < 1:
            raise ValueError(f"padding is the share of padded tokens in a batch, in [0, 1) (0: no padding, 0.2: a "
                             f"fifth of the tokens are padding), got {self.padding!r}.")  # fmt: skip
        if not isinstance(self.quantise_head, bool):
            raise ValueError(f"quantise_head must be True or False, got {self.quantise_head!r}.")
        check_choice("loss", self.loss, LOSSES)
        check_choice("quantised_layers", self.quantised_layers, QUANTISED_LAYERS)
        if self.gpu is not None:
            check_choice("gpu", self.gpu, tuple(CUBLAS_WORKSPACE_BYTES))
            if self.device != "cuda":
                raise ValueError(f"gpu={self.gpu!r} names a CUDA GPU, but device={self.device!r}: leave gpu at None "
                                 "for a CPU estimate.")  # fmt: skip
        if self.preference is not None:
            check_choice("preference", self.preference, PREFERENCES)
            if self.preference == "shared" and not method(self.method).freezes_base:
                raise ValueError(f"preference='shared' uses the base model with the adapters switched off as DPO's "
                                 f"reference, but {self.method!r} trains the base itself, so nothing frozen is left "
                                 "to share: use preference='copy' (a second copy of the model as the reference) or "
                                 "a method that keeps the base frozen.")  # fmt: skip
        if self.grad_checkpointing and not method(self.method).checkpointable:
            raise ValueError(
                f"{self.method!r} cannot train with gradient checkpointing: its prefix travels in "
                "the KV cache, which a checkpointed layer drops (peftlab.methods.prefix refuses it "
                "too). Set grad_checkpointing=False, or estimate another method, such as 'lora'."
            )
        if self.loss == "bf16" and self.precision in ("fp32", "bf16-mixed"):
            why = "the logits are fp32" if self.precision == "fp32" else "autocast runs cross-entropy in fp32 anyway"
            raise ValueError(f"loss='bf16' does not apply with precision={self.precision!r} ({why}): use pure "
                             "'bf16' or a quantised base, or loss='transformers'.")  # fmt: skip
        if self.loss != "chunked" and self.loss_chunk_tokens != 1024:
            raise ValueError(f"loss_chunk_tokens applies to loss='chunked' only (loss={self.loss!r}).")
        if self.precision not in QUANTISED and (self.quantised_layers != "blocks" or self.quantise_head):
            option = "quantise_head=True" if self.quantise_head else f"quantised_layers={self.quantised_layers!r}"
            raise ValueError(f"{option} applies to a quantised base ({', '.join(QUANTISED)}), not to "
                             f"precision={self.precision!r}.")  # fmt: skip
        if self.precision in QUANTISED and not method(self.method).freezes_base:
            frozen = ", ".join(name for name in METHOD_NAMES if method(name).freezes_base)
            raise ValueError(f"A quantised base ({self.precision}) cannot be trained by {self.method!r}: use a "
                             f"method that keeps the base frozen ({frozen}).")  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """Every field but the config: what a results row records. The mechanism options (accumulation, padding,
        loss, quantised layers, GPU) are listed only where they differ from their defaults, so that a row of an
        earlier results file, made before they existed, reads the same."""
        fields = {f.name: (getattr(self, f.name), f.default) for f in dataclasses.fields(self)}
        return {name: value for name, (value, default) in fields.items()
                if name != "method_config" and (name not in MECHANISMS or value != default)}  # fmt: skip


#: The fields of :class:`Setup` added for the mechanisms of issue 11 (off by default).
MECHANISMS = ("grad_accum_steps", "padding", "loss", "loss_chunk_tokens", "quantised_layers", "quantise_head", "gpu",
              "preference")  # fmt: skip


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
        rows = [{"term": term, "GiB": self.breakdown[term] / 2**30, "in peak": term in peak_terms}
                for term in (*TERMS, *PREFERENCE_TERMS) if term in self.breakdown]  # fmt: skip
        rows.append({"term": "peak", "GiB": self.peak / 2**30, "in peak": True})
        rows.append({"term": "CUDA context (beside)", "GiB": self.cuda_context / 2**30, "in peak": False})
        return pd.DataFrame(rows).set_index("term")


def _meta_copy(model_or_config) -> nn.Module:
    """The architecture on the meta device, as named or configured, or a copy of a given model (never changed)."""
    if isinstance(model_or_config, str | PretrainedConfig):
        config = models.architecture_config(model_or_config) if isinstance(model_or_config, str) else model_or_config
        task = "classification" if config.model_type == "bert" else "causal_lm"  # encoders train a task head
        return models.meta_model(config, task=task)
    model = copy.deepcopy(model_or_config).to("meta")
    model.tie_weights()  # moving a module moves each tied tensor apart: tie them again
    return model


def _with_method(model_or_config, setup: Setup) -> nn.Module:
    """The architecture on the meta device with the method applied (a given model is copied, not changed)."""
    return apply_method(_meta_copy(model_or_config), setup.method, setup.method_config)


def _reference_copy_bytes(model_or_config, setup: Setup) -> int:
    """Bytes of a second, frozen copy of the base model (no method) in the setup's storage precision: DPO's
    reference kept apart (``Setup(preference="copy")``). With a quantised base the copy is quantised alike."""
    # a given model is copied as it is (with applied=True its adapters too: a copy of the policy, as trl's deepcopy is)
    reference = _meta_copy(model_or_config).requires_grad_(False)
    return weight_bytes(reference, setup.precision)


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


def _check_options(model: nn.Module, setup: Setup) -> None:
    """The options that depend on the model: a loss option needs an LM head; a quantised head must be frozen and
    not tied to the input embeddings (quantising a tied head would untie it: the embedding stays 16-bit and the
    head gets a 4-bit copy, more bytes, not fewer; bitsandbytes leaves tied heads unquantised)."""
    base, _, _ = _base_of(model)
    head = base.get_output_embeddings()
    if setup.loss != "transformers" and head is None:
        raise ValueError(f"loss={setup.loss!r} applies to a language model's head; {type(base).__name__} has none "
                         "(an encoder's classifier logits are tiny): leave loss='transformers'.")  # fmt: skip
    if setup.quantised_layers == "targets" and not any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError(f"quantised_layers='targets' quantises the layers {setup.method!r} adapts, and it adapts "
                         "none (a soft prompt or prefix leaves every layer as it is): use 'blocks'.")  # fmt: skip
    if setup.quantise_head:
        if head is None:
            raise ValueError(f"quantise_head=True: {type(base).__name__} has no output head to quantise.")
        if getattr(head.weight, "requires_grad", False):  # a real 4-bit head (an NF4Tensor) never trains
            raise ValueError(
                "quantise_head=True, but the head trains (modules_to_save / train_head): a 4-bit "
                "weight cannot train; leave the head out of the trained modules or quantise_head off."
            )
        embedding = base.get_input_embeddings()
        if embedding is not None and embedding.weight is head.weight:
            raise ValueError("quantise_head=True, but the head is tied to the input embeddings "
                             "(tie_word_embeddings): quantising it would untie it and add a 4-bit copy beside the "
                             "16-bit embedding; bitsandbytes leaves tied heads in 16 bits. Leave quantise_head "
                             "off for this model.")  # fmt: skip


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
        if carried is None or carried.method != method(setup.method).record_name:
            have = carried.method if carried else "no method"
            raise ValueError(f"applied=True, but the model carries {have}, not {setup.method!r}: apply it first, or "
                             "pass applied=False to have the estimator apply it to a copy.")  # fmt: skip
        model = model_or_config
    else:
        model = _with_method(model_or_config, setup)
    _check_positions(model, setup)
    _check_options(model, setup)
    counts = count_parameters(model)
    precision, attn, device = setup.precision, setup.attn_implementation, setup.device
    compute_precision = "bf16" if precision in QUANTISED else precision
    padded = setup.padding > 0
    sequences = 2 * setup.batch_size if setup.preference else setup.batch_size  # DPO: B chosen + B rejected
    per_layer, dims = activation_bytes_per_layer(model, sequences, setup.seq_len, compute_precision, attn,
                                                 setup.grad_checkpointing, device, padded)  # fmt: skip
    logits = logits_bytes(model, dims, compute_precision, stream_grad=any(per_layer), loss=setup.loss,
                          chunk_tokens=setup.loss_chunk_tokens, head_quantised=setup.quantise_head)  # fmt: skip
    weights = weight_bytes(model, precision, setup.quantised_layers, setup.quantise_head)
    gradients = counts.trainable * parameter_bytes(precision)
    states = optimizer_state_bytes(counts.trainable, setup.optimizer, precision)
    workspace = optimizer_workspace_bytes(counts.trainable, setup.optimizer, precision)
    # a prompt or prefix encoder, and GPT-2's embedding dropout (outside the blocks: kept with checkpointing too)
    others = encoder_saved_bytes(model, compute_precision) + embedding_dropout_bytes(model, dims, compute_precision,
                                                                                       device)  # fmt: skip
    activations = sum(per_layer) + others
    # The short-lived peak on top of the saved tensors: the logits and the KV cache at the end of the forward pass,
    # the logits' gradients at the start of backward, or (with checkpointing) one block recomputed in backward.
    recompute = 0
    if setup.grad_checkpointing:
        recompute = max(activation_bytes_per_layer(model, sequences, setup.seq_len, compute_precision, attn,
                                                   False, device, padded)[0])  # fmt: skip
    cache = 0 if setup.grad_checkpointing else kv_cache_bytes(model, dims, compute_precision, attn, device)
    transient = max(logits["forward"] + cache, logits["backward"], recompute)
    breakdown = {"weights": weights, "gradients": gradients, "optimizer_states": states,
                 "activations": activations, "logits_and_loss": logits["saved"] + transient,
                 "optimizer_workspace": workspace}  # fmt: skip
    forward_terms = ["weights", "optimizer_states", "activations", "logits_and_loss"]
    step_terms = ["weights", "optimizer_states", "gradients", "optimizer_workspace"]
    if setup.grad_accum_steps > 1:  # the earlier micro-batches' gradients, alive through the later ones
        forward_terms.insert(2, "gradients")
    if setup.preference == "copy":  # a second copy of the base as the reference, alive in both phases
        breakdown["reference_weights"] = _reference_copy_bytes(model_or_config, setup)
        forward_terms.append("reference_weights")
        step_terms.append("reference_weights")
    if setup.gpu is not None:
        breakdown["cublas_workspace"] = CUBLAS_HANDLES * CUBLAS_WORKSPACE_BYTES[setup.gpu]
        forward_terms.append("cublas_workspace")
        step_terms.append("cublas_workspace")
    phases = {
        "forward and backward": {term: breakdown[term] for term in forward_terms},
        "optimizer step": {term: breakdown[term] for term in step_terms},
    }
    return MemoryEstimate(breakdown=breakdown, phases=phases, activations_per_layer=per_layer,
                          saved_bytes=activations + logits["saved"], trainable_parameters=counts.trainable,
                          total_parameters=counts.total, setup=setup)  # fmt: skip
