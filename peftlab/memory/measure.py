"""Measuring what a training step really uses: the bytes saved for backward (on any device) and the CUDA peak."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.memory.activations import _base_of

OPTIMIZERS = ("sgd", "sgd-momentum", "adamw", "adamw-8bit", "adagrad", "rmsprop")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; use one of {', '.join(map(str, allowed))}.")


def saved_tensor_bytes(model: nn.Module, batch: dict[str, torch.Tensor], autocast: bool = False) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (each storage once, parameters left
    out): the activation memory, measured on any device (the batch's tensors are moved to the model's device). Only
    counts: the pass is not meant for backward.

    The graph keeps nothing: the hook holds each storage in a list of its own until the call returns (so that no
    address is reused while counting). Returning the tensor to the graph would tie an op's saved *output* to the
    node that made it, a reference cycle through C++ that Python's collector cannot break: the graph would outlive
    the call and inflate every measurement after it (seen on an H100: +3.3 GB).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    held = []

    def pack(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
            held.append(storage)

    def unpack(_) -> torch.Tensor:
        raise RuntimeError("saved_tensor_bytes counts saved tensors and keeps none: this graph has no backward.")

    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                                enabled=autocast):  # fmt: skip
        model(**batch)
    return sum(storages.values())


def make_optimizer(model: nn.Module, optimizer: str, learning_rate: float = 1e-4) -> torch.optim.Optimizer:
    """The optimizer a name stands for, over the trainable parameters (8-bit Adam needs bitsandbytes and a GPU)."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw-8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=learning_rate)
    factories = {
        "sgd": lambda: torch.optim.SGD(params, lr=learning_rate),
        "sgd-momentum": lambda: torch.optim.SGD(params, lr=learning_rate, momentum=0.9),
        "adamw": lambda: torch.optim.AdamW(params, lr=learning_rate),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=learning_rate),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=learning_rate),
    }
    return factories[optimizer]()


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every block, non-reentrant (it works with frozen embeddings, where the reentrant
    kind silently computes no gradients). transformers renamed the switch in 5.2x; either name is used.

    The KV cache is switched off in the config (``use_cache=False``): training needs none, and a checkpointed block
    recomputed in the backward pass would write to it a second time, so transformers turns it off anyway, with a
    warning a learner did not ask for. Set ``model.config.use_cache = True`` again before generating."""
    base, _, _ = _base_of(model)
    for config in {id(c): c for c in (getattr(model, "config", None), base.config) if c is not None}.values():
        config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@dataclass
class Measurement:
    """What one run of training steps used. ``peak_allocated`` and ``reserved`` are CUDA-only (else None)."""

    saved_bytes: int
    peak_allocated: int | None = None
    reserved: int | None = None
    cuda_context: int | None = None
    device: str = "cpu"


def measure(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: str = "adamw", steps: int = 3,
            autocast: bool = False) -> Measurement:  # fmt: skip
    """Train ``steps`` optimizer steps on one batch and measure.

    On CUDA: the peak of ``torch.cuda.max_memory_allocated`` over the steps (the optimizer states exist from the
    second step on, so at least two are needed), the memory the caching allocator reserved, and the CUDA context
    (what the device uses beyond what PyTorch reserved). On every device: the bytes saved for backward in one
    forward pass (:func:`saved_tensor_bytes`).
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (optimizer states appear after the first step), got {steps}.")
    device = next(model.parameters()).device
    result = Measurement(saved_bytes=0, device=str(device))
    opt = make_optimizer(model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del loss, opt
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.peak_allocated = torch.cuda.max_memory_allocated(device)
        result.reserved = torch.cuda.memory_reserved(device)
        free, total = torch.cuda.mem_get_info(device)
        result.cuda_context = max(0, total - free - result.reserved)
    result.saved_bytes = saved_tensor_bytes(model, batch, autocast=autocast)
    return result
