"""GPU memory of a training step: an estimate term by term, and the measurement to check it against.

Training memory has five parts (notebook 02 derives each):

* **weights** — every parameter, at the bytes of its storage precision (fp32 4, bf16 2, int8 1, NF4 ½ plus
  the block scales);
* **gradients** — one per *trainable* parameter, in the parameter's dtype;
* **optimizer states** — AdamW keeps two (m and v), SGD with momentum one, plain SGD none, 8-bit Adam two bytes;
* **activations** — the tensors autograd saves in the forward pass for the backward pass, layer by layer; what
  is saved depends on which weights train (a frozen ``y = Wx`` never saves ``x``), on the attention kernel
  (eager saves the B·h·T² attention probabilities, SDPA's flash kernel only B·h·T), on the precision (autocast
  saves bf16 copies), and on activation checkpointing (only each block's input);
* **logits and loss** — B·T·V logits, their log-softmax and its gradient: at a 49k–152k vocabulary this term
  alone can pass the rest of the activations.

Two phases of a step set the peak: the end of the forward pass (weights, optimizer states, activations, logits)
and the optimizer step (weights, optimizer states, gradients, the optimizer's temporaries). ``estimate`` returns
each term, both phases and the peak; the CUDA context (the driver and kernels, 0.3–0.8 GB) is reported beside it,
not inside, because ``torch.cuda.max_memory_allocated`` does not see it.

Beyond one plain step, ``Setup`` switches on what else a training run holds (each off by default, where the
estimate is what it was without it): gradient accumulation (the gradients alive through later micro-batches),
padding (an explicit attention mask changes the kernel, as a prefix does), the loss (transformers' fp32 default,
bf16 cross-entropy, a chunked loss), which layers a quantised base quantises and whether its head too, and the GPU
(PyTorch's two cuBLAS workspaces, 2 × 32 MiB on an H100 or H200). LoRA dropout is read from the model's LoRA
layers, and a family's own dropouts from its config.

Checked against measurements (``tests/test_memory*.py``, ``benchmarks/memory_accuracy.py``): saved bytes on the CPU
for every family, method, precision and mechanism; peaks and saved bytes on an H100 (27 rows) and on an H200 (issue
11's held-out rows: the first reading, and the ``corrected`` block re-estimated with the mechanisms found in it —
a fit on those rows, not a prediction). Known gaps:

* BERT's peak (an encoder: no logits) falls inside the forward pass, above the saved tensors: on the H200, BERT-base
  16 × 512 bf16-mixed is 3 % (full) and 6 % (LoRA) under with the saved bytes within 0.4 %. The blocks' own
  short-lived tensors (derived: ≤ 38 MB full, ≤ 88 MB LoRA) would explain a quarter (full) to a half (LoRA) of it;
  the rest (a kernel's workspace, the allocator's rounding) needs a profile on a GPU. Not modelled.
* attention dropout on a CPU (SDPA leaves its fused kernel for the math path), and eager attention under CPU
  autocast (there softmax is not on autocast's fp32 list, as it is on CUDA);
* derived but not measured on a GPU: the bf16 and chunked losses' and a 4-bit head's short-lived tensors, the
  cuBLAS workspace of GPUs other than an H100 or H200 (PyTorch's default: 8 MiB + 128 KiB before Hopper);
* what the caching allocator rounds up: 0–55 MiB left under on the SmolLM2 rows once the workspaces are counted.

``measure`` runs real steps: on CUDA it records the peak of ``max_memory_allocated`` over several optimizer steps;
on any device it counts the bytes of the tensors saved for backward (``torch.autograd.graph.saved_tensors_hooks``),
which is the activation term, so that the estimate is checked on a CPU too.

The package, by concern: :mod:`~peftlab.memory.estimate` (the settings, the terms, the phases),
:mod:`~peftlab.memory.bytes` (weights, gradients, optimizer states), :mod:`~peftlab.memory.activations` (what each
family's blocks save), :mod:`~peftlab.memory.measure` (what a real step uses), :mod:`~peftlab.memory.zero` (ZeRO).
"""

from peftlab.memory.activations import LOSSES
from peftlab.memory.bytes import QUANTISED_LAYERS, quantised_bytes_per_parameter, weight_bytes
from peftlab.memory.estimate import (
    ATTENTION,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    GPUS,
    PRECISIONS,
    PREFERENCES,
    TERMS,
    MemoryEstimate,
    Setup,
    estimate,
)
from peftlab.memory.measure import (
    OPTIMIZERS,
    Measurement,
    enable_checkpointing,
    make_optimizer,
    measure,
    saved_tensor_bytes,
)
from peftlab.memory.zero import largest_layer_parameters, zero_model_states, zero_per_gpu

__all__ = ["ATTENTION", "CUBLAS_WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "GPUS", "LOSSES", "OPTIMIZERS", "PRECISIONS",
           "PREFERENCES", "QUANTISED_LAYERS", "TERMS", "Measurement", "MemoryEstimate", "Setup", "enable_checkpointing",
           "estimate",
           "largest_layer_parameters", "make_optimizer", "measure", "quantised_bytes_per_parameter",
           "saved_tensor_bytes", "weight_bytes", "zero_model_states", "zero_per_gpu"]  # fmt: skip
