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

Checked against measurements (``tests/test_memory*.py``, ``benchmarks/memory_accuracy.py``). Known gaps: padded
batches (a padding mask changes the attention kernel, as a prefix does), attention dropout on a CPU (SDPA's math
path), and GPT-2 under bf16 autocast on CUDA (cuDNN attention, the fused q, k, v storage and the KV cache's copies:
25–31 % under the measured saved bytes on an H100, where Llama and BERT shapes were within 1.6 %).

``measure`` runs real steps: on CUDA it records the peak of ``max_memory_allocated`` over several optimizer steps;
on any device it counts the bytes of the tensors saved for backward (``torch.autograd.graph.saved_tensors_hooks``),
which is the activation term, so that the estimate is checked on a CPU too.

The package, by concern: :mod:`~peftlab.memory.estimate` (the settings, the terms, the phases),
:mod:`~peftlab.memory.bytes` (weights, gradients, optimizer states), :mod:`~peftlab.memory.activations` (what each
family's blocks save), :mod:`~peftlab.memory.measure` (what a real step uses), :mod:`~peftlab.memory.zero` (ZeRO).
"""

from peftlab.memory.bytes import quantised_bytes_per_parameter, weight_bytes
from peftlab.memory.estimate import (
    ATTENTION,
    CUDA_CONTEXT_BYTES,
    GPUS,
    PRECISIONS,
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
from peftlab.memory.zero import zero_per_gpu

__all__ = ["ATTENTION", "CUDA_CONTEXT_BYTES", "GPUS", "OPTIMIZERS", "PRECISIONS", "TERMS", "Measurement",
           "MemoryEstimate", "Setup", "enable_checkpointing", "estimate", "make_optimizer", "measure",
           "quantised_bytes_per_parameter", "saved_tensor_bytes", "weight_bytes", "zero_per_gpu"]  # fmt: skip
