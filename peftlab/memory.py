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
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from transformers import PretrainedConfig

from peftlab import models
from peftlab.methods import METHOD_NAMES, adalora, adapter, apply_method, ia3, lora, prefix, prompt, qlora
from peftlab.params import count_parameters

PRECISIONS = ("fp32", "bf16-mixed", "bf16", "int8", "nf4", "nf4-dq")
OPTIMIZERS = ("sgd", "sgd-momentum", "adamw", "adamw-8bit", "adagrad", "rmsprop")
ATTENTION = ("sdpa", "eager")
TERMS = ("weights", "gradients", "optimizer_states", "activations", "logits_and_loss", "optimizer_workspace")
#: Bytes of optimizer state per trainable parameter, per byte of the parameter (8-bit Adam: 2 bytes whatever).
STATES_PER_PARAMETER = {"sgd": 0, "sgd-momentum": 1, "adamw": 2, "adagrad": 1, "rmsprop": 1}
#: GPU memory as nvidia-smi reports it (MiB), for "does it fit".
GPUS = {"T4 16 GB": 15_360 * 2**20, "A100 40 GB": 40_960 * 2**20, "A100 80 GB": 81_920 * 2**20,
        "H100 80 GB": 81_559 * 2**20}  # fmt: skip
#: A typical CUDA context (driver, cuBLAS and cuDNN handles, kernels): measured 0.3-0.8 GiB (0.75 on an H100 with
#: torch 2.11); it is not allocated through PyTorch's allocator, so it is shown beside the estimate, never inside it.
CUDA_CONTEXT_BYTES = 512 * 2**20
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256


@dataclass
class MemoryEstimate:
    """The estimate: each term in bytes, the two phases, the peak, and the settings it was made for."""

    breakdown: dict[str, int]
    phases: dict[str, dict[str, int]]
    activations_per_layer: list[int]
    saved_bytes: int  # everything saved for backward at the end of the forward pass (what saved_tensor_bytes counts)
    trainable_parameters: int
    total_parameters: int
    settings: dict
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
        return self.peak + self.cuda_context <= GPUS[gpu]

    def table(self) -> pd.DataFrame:
        """One row per term, in GiB and as a share of the peak phase."""
        peak_terms = self.phases[self.peak_phase]
        rows = [{"term": term, "GiB": self.breakdown[term] / 2**30, "in peak": term in peak_terms} for term in TERMS]
        rows.append({"term": "peak", "GiB": self.peak / 2**30, "in peak": True})
        rows.append({"term": "CUDA context (beside)", "GiB": self.cuda_context / 2**30, "in peak": False})
        return pd.DataFrame(rows).set_index("term")


# ----------------------------------------------------------------------------------------------------------------
# Weights, gradients, optimizer states
# ----------------------------------------------------------------------------------------------------------------
def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; use one of {', '.join(map(str, allowed))}.")


def quantised_bytes_per_parameter(precision: str) -> float:
    """Bytes per weight of a quantised base matrix: int8 1 (+ a fp32 scale per row, counted apart), NF4 ½ plus an
    fp32 absmax per block of 64 (0.5625), NF4 with double quantisation ½ plus an 8-bit absmax per block of 64 and
    an fp32 scale per 256 blocks (≈ 0.5159; Dettmers et al., 2023)."""
    if precision == "int8":
        return 1.0
    if precision == "nf4":
        return 0.5 + 4 / NF4_BLOCK
    return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DQ_BLOCK)


def _is_quantisable(name: str, module: nn.Module) -> bool:
    """Quantisation (int8, NF4) touches the frozen linear layers of the blocks, never embeddings, norms, heads or the
    method's own parameters — as bitsandbytes and QLoRA do."""
    from transformers.pytorch_utils import Conv1D

    is_linear = isinstance(module, nn.Linear | Conv1D)
    method_owned = any(part in name for part in ("lora_", "adapter", "ia3_", "prompt_encoder", "prefix"))
    return is_linear and not method_owned and ".lm_head" not in f".{name}" and "classifier" not in name


def weight_bytes(model: nn.Module, precision: str) -> int:
    """Bytes of every parameter in its storage precision (see the module docstring). With a quantised base the
    frozen linear layers of the blocks are quantised; everything else is bf16."""
    dense = {"fp32": 4, "bf16-mixed": 4, "bf16": 2, "int8": 2, "nf4": 2, "nf4-dq": 2}[precision]
    quantised = set()
    if precision in ("int8", "nf4", "nf4-dq"):
        for name, module in model.named_modules():
            if _is_quantisable(name, module) and not module.weight.requires_grad:
                quantised.add(id(module.weight))
    total = 0.0
    for param in model.parameters():
        if id(param) in quantised:
            total += param.numel() * quantised_bytes_per_parameter(precision)
            if precision == "int8":
                total += 4 * param.shape[0]  # one fp32 scale per output row
        else:
            master_in_fp32 = param.requires_grad and precision in ("fp32", "bf16-mixed")
            total += param.numel() * (4 if master_in_fp32 else dense)
    return math.ceil(total)


def _parameter_bytes(precision: str) -> int:
    """Bytes of a trainable parameter: fp32 master weights in fp32 and bf16-mixed; bf16 in pure bf16 and on a
    quantised base (QLoRA trains its adapters in the bf16 compute dtype)."""
    return 4 if precision in ("fp32", "bf16-mixed") else 2


def optimizer_state_bytes(trainable: int, optimizer: str, precision: str) -> int:
    """States per trainable parameter: AdamW m and v; momentum one; AdaGrad and RMSprop one running sum;
    8-bit Adam two 1-byte states plus an fp32 absmax per block of 2048 per state (Dettmers et al., 2022)."""
    if optimizer == "adamw-8bit":
        return 2 * trainable + 2 * 4 * math.ceil(trainable / 2048)
    return STATES_PER_PARAMETER[optimizer] * _parameter_bytes(precision) * trainable


def optimizer_workspace_bytes(trainable: int, optimizer: str, precision: str) -> int:
    """Temporaries of the step. torch's multi-tensor (foreach) AdamW, AdaGrad and RMSprop compute a square root of
    their second-moment state as a new list of tensors (one copy of the trainable parameters); SGD, with or without
    momentum, updates in place; 8-bit Adam works in blocks (no full copy)."""
    copies = {"sgd": 0, "sgd-momentum": 0, "adamw": 1, "adamw-8bit": 0, "adagrad": 1, "rmsprop": 1}[optimizer]
    return copies * _parameter_bytes(precision) * trainable


# ----------------------------------------------------------------------------------------------------------------
# Activations: the tensors saved for backward, block by block
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Linear:
    """How one projection of a block is set up for training."""

    in_features: int
    out_features: int
    weight_trains: bool = False
    bias_trains: bool = False
    lora_rank: int = 0
    lora_a_trains: bool = True
    ia3: str = ""  # "", "output" or "input"
    adapter_bottleneck: int = 0


@dataclass
class Dims:
    batch: int
    tokens: int  # query positions (input tokens plus soft-prompt tokens)
    keys: int  # key positions (tokens plus prefix tokens)
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass
class Precision:
    """Byte sizes of what the forward pass computes in."""

    stream: int  # the residual stream between blocks
    compute: int  # matmul inputs and outputs
    autocast: bool  # bf16-mixed: matmuls cast their (fp32) inputs to bf16 copies

    @classmethod
    def of(cls, precision: str) -> Precision:
        if precision == "fp32":
            return cls(stream=4, compute=4, autocast=False)
        if precision == "bf16-mixed":
            return cls(stream=4, compute=2, autocast=True)
        return cls(stream=2, compute=2, autocast=False)


@dataclass
class Tally:
    """Bytes saved for backward, by the part of the block that saves them. A tensor saved by several operations
    (the normalised input of q, k and v) is counted once: pass the same ``key``."""

    parts: dict[str, int] = field(default_factory=dict)
    keys: set = field(default_factory=set)

    def add(self, part: str, elements: int, bytes_per_element: int, key: str | None = None) -> None:
        if key is not None:
            if key in self.keys:
                return
            self.keys.add(key)
        self.parts[part] = self.parts.get(part, 0) + elements * bytes_per_element

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _linear(tally: Tally, name: str, layer: Linear, rows: int, source: str, input_needs_grad: bool, p: Precision,
            input_bytes: int) -> bool:  # fmt: skip
    """What ``y = W x (+ b)`` and its method save; returns whether ``y`` needs a gradient.

    A matmul saves its input when the weight trains (for ∂L/∂W = δ xᵀ) and its weight when the input needs a
    gradient (for ∂L/∂x = Wᵀ δ). The weight is a parameter and costs nothing new, except under autocast: there each
    matmul casts its inputs to bf16 copies (the trained weights' copies are cached for the whole forward pass). A
    bias needs no saved tensor. ``source`` names the input tensor, so that a tensor saved by several operations is
    counted once: the input shared by q, k and v, or the output of a fused attention kernel, which the kernel saves
    and the output projection reads. Under autocast each projection saves its own bf16 copy of an fp32 input; an
    input already in the compute dtype is not copied.
    """
    shared = None if p.autocast and input_bytes != p.compute else source
    x_bytes = p.compute if p.autocast else input_bytes
    if layer.weight_trains:
        tally.add("inputs of trained projections", rows * layer.in_features, x_bytes, key=shared)
    if p.autocast and (input_needs_grad or layer.weight_trains):
        tally.add("bf16 weight copies (autocast)", layer.in_features * layer.out_features, p.compute)
    output_needs_grad = input_needs_grad or layer.weight_trains or layer.bias_trains
    if layer.lora_rank:
        if layer.lora_a_trains:
            tally.add("inputs of trained projections", rows * layer.in_features, x_bytes, key=shared)
        tally.add("LoRA A·x", rows * layer.lora_rank, p.compute)
        if p.autocast:
            tally.add("bf16 weight copies (autocast)", layer.lora_rank * (layer.in_features + layer.out_features), 2)
        output_needs_grad = True
    if layer.ia3 == "output":
        tally.add("IA3 scaled outputs", rows * layer.out_features, p.compute)
        output_needs_grad = True
    if layer.ia3 == "input":
        tally.add("IA3 scaled inputs", rows * layer.in_features, input_bytes, key=shared)
        output_needs_grad = True
    if layer.adapter_bottleneck:
        tally.add("adapter inputs", rows * layer.out_features, p.compute)
        tally.add("adapter bottleneck", rows * layer.adapter_bottleneck, p.compute)
        if p.autocast:
            tally.add("bf16 weight copies (autocast)", 2 * layer.out_features * layer.adapter_bottleneck, 2)
        output_needs_grad = True
    return output_needs_grad


def _attention(tally: Tally, dims: Dims, attn: str, p: Precision, gqa_in_kernel: bool, softmax_fp32: bool,
               output_is_projection_input: bool) -> None:  # fmt: skip
    """The attention kernel's saved tensors. SDPA (flash / memory-efficient): q, k, v, the output and the log-sum-exp
    (fp32, B·h·T). Where q comes from its own projection (Llama, BERT: ``view(B, T, h, d).transpose(1, 2)``) the
    fused kernels write the output in that token-major layout, and the output projection reads that very storage:
    one tensor, counted once (``key="attention"``, the projection's source). GPT-2 slices q, k and v out of one
    fused output, and its output projection gets a copy (measured). Eager: q and the keys and values repeated to
    every head, and the B·h·T·T_k probabilities (fp32, plus their bf16 copy under autocast); its output is a copy of
    its own."""
    rows, key_rows = dims.batch * dims.tokens, dims.batch * dims.keys
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    if attn == "sdpa":
        kv_width = kv if gqa_in_kernel else q
        tally.add("attention q, k, v", rows * q + key_rows * 2 * kv_width, p.compute)
        tally.add("attention output", rows * q, p.compute, key="attention" if output_is_projection_input else None)
        tally.add("attention log-sum-exp", dims.batch * dims.heads * dims.tokens, 4)
        if dims.keys > dims.tokens:  # a prefix: the kernel gets (and keeps) an explicit B·T·(n+T) mask
            tally.add("attention mask", dims.batch * dims.tokens * dims.keys, p.compute)
        return
    tally.add("attention q, k, v", rows * q + key_rows * 2 * q, p.compute)
    probabilities = dims.batch * dims.heads * dims.tokens * dims.keys
    if softmax_fp32 or p.autocast:  # Llama upcasts the softmax; autocast runs every softmax in fp32
        tally.add("attention probabilities (fp32 softmax)", probabilities, 4)
        if p.compute == 2:  # cast back to bf16 for the product with V
            tally.add("attention probabilities (bf16 copy)", probabilities, 2)
    else:
        tally.add("attention probabilities", probabilities, p.compute)


def _llama_block(dims: Dims, layers: dict[str, Linear], norms_train: bool, stream_needs_grad: bool, attn: str,
                 p: Precision, gqa_in_kernel: bool) -> Tally:  # fmt: skip
    """Saved tensors of one Llama block (RMSNorm → attention → residual → RMSNorm → SwiGLU → residual)."""
    tally = Tally()
    rows, d, f = dims.batch * dims.tokens, dims.hidden, dims.ffn

    def rms_norm(name: str, input_needs_grad: bool) -> bool:
        # HF's RMSNorm computes in fp32: x32 = x.float(); x32 * rsqrt(mean(x32²) + ε); weight * that.to(dtype)
        if input_needs_grad:
            tally.add("RMSNorm inputs (fp32)", rows * d, 4)
            tally.add("RMSNorm 1/rms", rows, 4)
        if norms_train:
            tally.add("RMSNorm normalised", rows * d, p.stream)
        return input_needs_grad or norms_train

    x_grad = rms_norm("norm 1", stream_needs_grad)
    q_grad, k_grad, v_grad = (_linear(tally, key, layers[key], rows, "norm 1", x_grad, p, p.stream) for key in "qkv")
    attention_grad = q_grad or k_grad or v_grad or dims.keys > dims.tokens  # a trained prefix enters here
    if attention_grad:
        _attention(tally, dims, attn, p, gqa_in_kernel, softmax_fp32=True, output_is_projection_input=True)
    o_grad = _linear(tally, "o", layers["o"], rows, "attention", attention_grad, p, p.compute)
    residual_grad = stream_needs_grad or o_grad
    x_grad = rms_norm("norm 2", residual_grad)
    gate_grad, up_grad = (
        _linear(tally, key, layers[key], rows, "norm 2", x_grad, p, p.stream) for key in ("gate", "up")
    )
    if gate_grad:
        tally.add("SiLU input", rows * f, p.compute)
    if gate_grad or up_grad:  # the product saves each factor whose partner needs a gradient
        tally.add("SiLU(gate) · up factors", rows * f * (2 if gate_grad and up_grad else 1), p.compute)
    _linear(tally, "down", layers["down"], rows, "SwiGLU", gate_grad or up_grad, p, p.compute)
    return tally


def _layer_norm(tally: Tally, rows: int, d: int, input_needs_grad: bool, weights_train: bool, p: Precision) -> bool:
    """LayerNorm (GPT-2, BERT) saves its input and the per-token mean and 1/σ (fp32) whenever anything in it needs a
    gradient; under autocast it runs in fp32."""
    if input_needs_grad or weights_train:
        tally.add("LayerNorm inputs", rows * d, 4 if p.autocast else p.stream)
        tally.add("LayerNorm mean and 1/σ", rows * 2, 4)
    return input_needs_grad or weights_train


def _gpt2_block(dims: Dims, layers: dict[str, Linear], norms_train: bool, stream_needs_grad: bool, attn: str,
                p: Precision) -> Tally:  # fmt: skip
    """Saved tensors of one GPT-2 block (LayerNorm → fused q,k,v → attention → residual → LayerNorm → GELU MLP)."""
    tally = Tally()
    rows, d, f = dims.batch * dims.tokens, dims.hidden, dims.ffn
    x_grad = _layer_norm(tally, rows, d, stream_needs_grad, norms_train, p)
    qkv_grad = _linear(tally, "c_attn", layers["c_attn"], rows, "ln_1", x_grad, p, p.stream)
    if qkv_grad:  # q, k and v are views of one c_attn output: the kernel saves that storage once
        dims_mha = Dims(**{**dims.__dict__, "kv_heads": dims.heads})
        _attention(tally, dims_mha, attn, p, gqa_in_kernel=True, softmax_fp32=False, output_is_projection_input=False)
    o_grad = _linear(tally, "attn.c_proj", layers["attn.c_proj"], rows, "attention", qkv_grad, p, p.compute)
    x_grad = _layer_norm(tally, rows, d, stream_needs_grad or o_grad, norms_train, p)
    fc_grad = _linear(tally, "c_fc", layers["c_fc"], rows, "ln_2", x_grad, p, p.stream)
    if fc_grad:  # GELU(tanh) = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))): x, 0.5x, tanh and 1 + tanh are saved
        tally.add("GELU intermediates", rows * f * 4, p.compute)
    _linear(tally, "mlp.c_proj", layers["mlp.c_proj"], rows, "GELU", fc_grad, p, p.compute)
    return tally


def _bert_block(dims: Dims, layers: dict[str, Linear], norms_train: bool, stream_needs_grad: bool, attn: str,
                device: str, p: Precision, dropout: bool) -> Tally:  # fmt: skip
    """Saved tensors of one BERT block (q, k, v → attention → dense → LayerNorm(+x) → GELU FFN → LayerNorm(+x)).
    Dropout in training saves a mask per element after each dense layer: one byte on CUDA (a fused kernel's boolean
    mask), an element of the layer's output dtype on a CPU (there dropout multiplies by a scaled mask).
    (Attention dropout is not modelled: with it, SDPA on a CPU leaves the fused kernel for the math path.)"""
    tally = Tally()
    rows, d, f = dims.batch * dims.tokens, dims.hidden, dims.ffn
    q_grad, k_grad, v_grad = (
        _linear(tally, key, layers[key], rows, "block input", stream_needs_grad, p, p.stream) for key in "qkv"
    )
    attention_grad = q_grad or k_grad or v_grad or dims.keys > dims.tokens
    if attention_grad:
        dims_mha = Dims(**{**dims.__dict__, "kv_heads": dims.heads})
        _attention(tally, dims_mha, attn, p, gqa_in_kernel=True, softmax_fp32=False, output_is_projection_input=True)
    o_grad = _linear(tally, "attention.output", layers["attention.output"], rows, "attention", attention_grad, p,
                     p.compute)  # fmt: skip
    if dropout and o_grad:
        tally.add("dropout masks", rows * d, 1 if device == "cuda" else p.compute)
    x_grad = _layer_norm(tally, rows, d, stream_needs_grad or o_grad, norms_train, p)
    up_grad = _linear(tally, "intermediate", layers["intermediate"], rows, "LayerNorm 1", x_grad, p, p.stream)
    if up_grad:
        tally.add("GELU inputs", rows * f, p.compute)
    down_grad = _linear(tally, "output", layers["output"], rows, "GELU", up_grad, p, p.compute)
    if dropout and down_grad:
        tally.add("dropout masks", rows * d, 1 if device == "cuda" else p.compute)
    _layer_norm(tally, rows, d, x_grad or down_grad, norms_train, p)
    return tally


# ----------------------------------------------------------------------------------------------------------------
# Reading a model after a method was applied
# ----------------------------------------------------------------------------------------------------------------
#: Per family: the projections of a block, and one norm whose parameters say whether norms train.
LAYOUTS = {
    "llama": ({"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}, "input_layernorm"),
    "gpt2": ({"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"},
             "ln_1"),
    "bert": ({"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
              "attention.output": "attention.output.dense", "intermediate": "intermediate.dense",
              "output": "output.dense"}, "attention.output.LayerNorm"),
}  # fmt: skip


def _describe_linear(module: nn.Module) -> Linear:
    """Unwrap a (possibly LoRA-, AdaLoRA-, IA3- or adapter-wrapped, possibly 4-bit) projection into a
    :class:`Linear`."""
    description = Linear(0, 0)
    while True:
        if isinstance(module, adalora.AdaLoRALinear):  # saves x and Q·x like LoRA's x and A·x (plus r numbers)
            description.lora_rank = module.lora_Q.shape[0]
            description.lora_a_trains = module.lora_Q.requires_grad
            module = module.base_layer
        elif isinstance(module, lora.LoRALinear):
            description.lora_rank = module.lora_A.out_features
            description.lora_a_trains = module.lora_A.weight.requires_grad
            module = module.base_layer
        elif isinstance(module, ia3.IA3Scaled):
            description.ia3 = "input" if module.scale_input else "output"
            module = module.base
        elif isinstance(module, adapter.AdapterWrapped):
            description.adapter_bottleneck = module.adapter.down.out_features
            module = module.base
        else:
            break
    if isinstance(module, qlora.Linear4bit):  # a frozen NF4 weight: it never trains
        description.in_features, description.out_features = module.in_features, module.out_features
        description.bias_trains = module.bias is not None and module.bias.requires_grad
        return description
    weight = module.weight
    is_conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores its weight as [in, out]
    description.in_features, description.out_features = weight.shape if is_conv1d else weight.shape[::-1]
    description.weight_trains = weight.requires_grad
    description.bias_trains = module.bias is not None and module.bias.requires_grad
    return description


def _base_of(model: nn.Module) -> tuple[nn.Module, int, int]:
    """The transformers model under a prompt or prefix wrapper, with the virtual tokens it adds to the queries and
    to the keys."""
    if isinstance(model, prompt.VirtualTokenModel):
        return model.base_model, model.num_virtual_tokens, 0
    if isinstance(model, prefix.PrefixTunedModel):
        return model.base_model, 0, model.num_virtual_tokens
    return model, 0, 0


def _dims(config: PretrainedConfig, batch_size: int, tokens: int, keys: int) -> Dims:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return Dims(
        batch=batch_size, tokens=tokens, keys=keys, hidden=hidden,
        ffn=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads, vocab=config.vocab_size,
    )  # fmt: skip


DEVICES = ("cuda", "cpu")


def sdpa_falls_back_to_math(dims: Dims, precision: Precision, device: str) -> bool:
    """On CUDA, SDPA in fp32 with grouped-query attention has no fused kernel (flash needs 16-bit inputs, the
    memory-efficient kernel has no GQA), so PyTorch runs the math path, which saves what eager attention saves. The
    CPU's flash kernel takes fp32 and GQA. With a prefix the call carries an explicit mask, transformers repeats k
    and v to every head itself (it hands GQA to the kernel only without a mask), and the memory-efficient kernel
    takes the fp32 inputs and the mask: no fallback (measured on an H100: SmolLM2, prefix tuning, 4 × 512). The
    estimate assumes batches without padding: a padding mask would have the prefix's effect, which is not modelled."""
    grouped_in_kernel = dims.kv_heads < dims.heads and dims.keys == dims.tokens
    return device == "cuda" and precision.compute == 4 and grouped_in_kernel


def activation_bytes_per_layer(model: nn.Module, batch_size: int, seq_len: int, precision: str, attn: str,
                               grad_checkpointing: bool, device: str = "cuda") -> tuple[list[int], Dims]:  # fmt: skip
    """Saved-for-backward bytes of each block (see :func:`estimate`), and the dimensions they were computed for."""
    base, extra_queries, extra_keys = _base_of(model)
    layout = models.family(base.config, needed_by="The memory estimator")
    projections, norm_path = LAYOUTS[layout]
    p = Precision.of(precision)
    dims = _dims(base.config, batch_size, seq_len + extra_queries, seq_len + extra_queries + extra_keys)
    rows = dims.batch * dims.tokens
    dropout = layout == "bert" and base.config.hidden_dropout_prob > 0
    embeddings_train = any(param.requires_grad for name, param in base.named_parameters() if "embed" in name)
    stream_grad = extra_queries > 0 or embeddings_train  # a soft prompt or trained embeddings feed the first block
    per_layer = []
    for block in models.transformer_blocks(base)[1]:
        layers = {key: _describe_linear(block.get_submodule(path)) for key, path in projections.items()}
        norms_train = any(param.requires_grad for param in block.get_submodule(norm_path).parameters())
        block_trains = any(param.requires_grad for param in block.parameters()) or extra_keys > 0
        if grad_checkpointing:
            per_layer.append(rows * dims.hidden * p.stream if (stream_grad or block_trains) else 0)
        elif layout == "llama":
            kernel = "eager" if attn == "sdpa" and sdpa_falls_back_to_math(dims, p, device) else attn
            gqa = kernel == "sdpa" and dims.keys == dims.tokens  # a prefix needs a mask: the kernel repeats k and v
            per_layer.append(_llama_block(dims, layers, norms_train, stream_grad, kernel, p, gqa).total)
        elif layout == "gpt2":
            per_layer.append(_gpt2_block(dims, layers, norms_train, stream_grad, attn, p).total)
        else:
            per_layer.append(_bert_block(dims, layers, norms_train, stream_grad, attn, device, p, dropout).total)
        stream_grad = stream_grad or block_trains
    return per_layer, dims


def kv_cache_bytes(model: nn.Module, dims: Dims, precision: str, attn: str, device: str) -> int:
    """A Llama-style model called with ``use_cache=True`` (the default, also in training) keeps every layer's keys
    and values in a ``DynamicCache`` until the output is dropped: 2·L·B·T·d_kv numbers in the stream dtype. Where the
    attention kernel saves those very tensors for backward (SDPA's fused kernels in pure fp32 or bf16), the cache
    costs nothing more; under autocast, in eager attention and in the math fallback it holds copies of its own.
    Activation checkpointing turns the cache off."""
    base, _, _ = _base_of(model)
    if models.family(base.config) != "llama":
        return 0
    p = Precision.of(precision)
    shares_storage = attn == "sdpa" and not p.autocast and not sdpa_falls_back_to_math(dims, p, device)
    if shares_storage:
        return 0
    layers = base.config.num_hidden_layers
    return 2 * layers * dims.batch * dims.keys * dims.kv_heads * dims.head_dim * p.stream


def _encoder_ends_saved_bytes(base: nn.Module, dims: Dims, p: Precision) -> int:
    """BERT's embedding LayerNorm keeps its input when it trains (BitFit, full); its pooler keeps the last hidden
    state ([CLS] is a view of it) when the pooler trains."""
    rows, saved = dims.batch * dims.tokens, 0
    embedding_norm = [param for name, param in base.named_parameters() if "embeddings.LayerNorm" in name]
    if any(param.requires_grad for param in embedding_norm):
        saved += rows * dims.hidden * (4 if p.autocast else p.stream) + rows * 8
    pooler = [param for name, param in base.named_parameters() if "pooler.dense.weight" in name]
    if any(param.requires_grad for param in pooler):
        saved += rows * dims.hidden * (p.compute if p.autocast else p.stream)
    return saved


def logits_bytes(model: nn.Module, dims: Dims, precision: str, stream_grad: bool) -> dict[str, int]:
    """The final norm, the LM head and the loss: what they save, and what lives only for a moment.

    Saved: the final RMSNorm's input; the LM head's input when the head trains (tied embeddings train in full
    fine-tuning) and, under autocast, its bf16 weight copy; the fp32 log-softmax that cross-entropy keeps (4 bytes
    per logit). Short-lived, at the end of the forward pass: the logits (in the compute dtype) and their fp32 copy
    for the loss; at the start of backward: the gradients of the log-probabilities and of the logits, two fp32
    B·T·V tensors (8 bytes per logit; measured on an H100, the larger of the two in every benchmark row).
    """
    base, _, _ = _base_of(model)
    rows, logits = dims.batch * dims.tokens, dims.batch * dims.tokens * dims.vocab
    p = Precision.of(precision)
    if base.get_output_embeddings() is None:  # an encoder: tiny logits, but the embedding LayerNorm and the pooler
        return {"saved": _encoder_ends_saved_bytes(base, dims, p), "forward": 0, "backward": 0}
    head = base.get_output_embeddings().weight
    saved = 0
    if stream_grad:  # the final norm: RMSNorm keeps its fp32 input and 1/rms, LayerNorm its input, mean and 1/σ
        saved += rows * dims.hidden * 4 + rows * (4 if models.family(base.config) == "llama" else 8)
    if head.requires_grad:
        saved += rows * dims.hidden * (p.compute if p.autocast else p.stream)
    if p.autocast and (stream_grad or head.requires_grad):
        saved += head.numel() * 2
    saved += logits * 4
    forward = logits * p.compute + (logits * 4 if p.compute != 4 else 0)
    backward = logits * 8
    return {"saved": saved, "forward": forward, "backward": backward}


def encoder_saved_bytes(model: nn.Module, precision: str) -> int:
    """What a prompt or prefix encoder (P-tuning's MLP, prefix tuning's reparametrisation) saves: its layers' inputs
    for n virtual tokens, tanh outputs, and under autocast its bf16 weight copies. Small next to the blocks."""
    encoder = getattr(model, "prompt_encoder", None) or getattr(model, "prefix_encoder", None)
    if encoder is None:
        return 0
    p = Precision.of(precision)
    rows = model.num_virtual_tokens
    total = 0
    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            total += rows * module.in_features * (p.compute if p.autocast else p.stream)
            total += module.weight.numel() * 2 if p.autocast else 0
        elif isinstance(module, nn.Tanh | nn.ReLU):
            total += rows * encoder_width(encoder) * p.compute
    return total


def encoder_width(encoder: nn.Module) -> int:
    """The hidden width of an encoder MLP: the out_features of its first linear layer."""
    return next(m.out_features for m in encoder.modules() if isinstance(m, nn.Linear))


def _with_method(model_or_config, method: str, method_config) -> nn.Module:
    """The architecture on the meta device with the method applied (a given model is copied, not changed)."""
    if isinstance(model_or_config, str | PretrainedConfig):
        config = models.architecture_config(model_or_config) if isinstance(model_or_config, str) else model_or_config
        task = "classification" if config.model_type == "bert" else "causal_lm"  # encoders train a task head
        model = models.meta_model(config, task=task)
    else:
        model = copy.deepcopy(model_or_config).to("meta")
        model.tie_weights()  # moving a module moves each tied tensor apart: tie them again
    return apply_method(model, method, method_config)


def estimate(
    model_or_config,
    method: str = "full",
    method_config=None,
    batch_size: int = 1,
    seq_len: int = 512,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    grad_checkpointing: bool = False,
    attn_implementation: str = "sdpa",
    applied: bool = False,
    device: str = "cuda",
) -> MemoryEstimate:
    """Estimate the GPU memory of one training step (see the module docstring for the terms).

    ``model_or_config`` is an architecture name (``"llama-3-8b"``), a transformers config, or a model; the method
    is applied for real on the meta device, so the trainable count is exact. ``precision``: ``fp32``;
    ``bf16-mixed`` (fp32 weights, bf16 autocast); ``bf16`` (pure bf16); ``int8``, ``nf4``, ``nf4-dq`` (a quantised
    frozen base, bf16 compute, as in QLoRA). ``applied=True`` takes a model that already has the method applied
    (the one you are about to train) as it is. ``device`` says whose attention kernels are modelled (``cuda``, or
    ``cpu`` to check the estimate on a CPU).
    """
    _check_choice("method", method, METHOD_NAMES)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("attn_implementation", attn_implementation, ATTENTION)
    _check_choice("device", device, DEVICES)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if precision in ("int8", "nf4", "nf4-dq") and method not in ("lora", "qlora", "ia3", "adapter", "prompt",
                                                                  "ptuning", "prefix"):  # fmt: skip
        raise ValueError(f"A quantised base ({precision}) cannot be trained by {method!r}: use a method that keeps "
                         "the base frozen (lora, qlora, ia3, adapter, prompt, ptuning, prefix).")  # fmt: skip
    model = model_or_config if applied else _with_method(model_or_config, method, method_config)
    counts = count_parameters(model)
    compute_precision = "bf16" if precision in ("int8", "nf4", "nf4-dq") else precision
    per_layer, dims = activation_bytes_per_layer(model, batch_size, seq_len, compute_precision, attn_implementation,
                                                 grad_checkpointing, device)  # fmt: skip
    logits = logits_bytes(model, dims, compute_precision, stream_grad=any(per_layer))
    weights = weight_bytes(model, precision)
    gradients = counts.trainable * _parameter_bytes(precision)
    states = optimizer_state_bytes(counts.trainable, optimizer, precision)
    workspace = optimizer_workspace_bytes(counts.trainable, optimizer, precision)
    activations = sum(per_layer) + encoder_saved_bytes(model, compute_precision)
    # The short-lived peak on top of the saved tensors: the logits and the KV cache at the end of the forward pass,
    # the logits' gradients at the start of backward, or (with checkpointing) one block recomputed in backward.
    recompute = 0
    if grad_checkpointing:
        recompute = max(activation_bytes_per_layer(model, batch_size, seq_len, compute_precision, attn_implementation,
                                                   False, device)[0])  # fmt: skip
    cache = 0 if grad_checkpointing else kv_cache_bytes(model, dims, compute_precision, attn_implementation, device)
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
    settings = {"method": method, "batch_size": batch_size, "seq_len": seq_len, "precision": precision,
                "optimizer": optimizer, "grad_checkpointing": grad_checkpointing,
                "attn_implementation": attn_implementation}  # fmt: skip
    return MemoryEstimate(breakdown=breakdown, phases=phases, activations_per_layer=per_layer,
                          saved_bytes=sum(per_layer) + encoder_saved_bytes(model, compute_precision) + logits["saved"],
                          trainable_parameters=counts.trainable,
                          total_parameters=counts.total, settings=settings)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
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
    _check_choice("optimizer", optimizer, OPTIMIZERS)
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
    kind silently computes no gradients). transformers renamed the switch in 5.2x; either name is used."""
    base, _, _ = _base_of(model)
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
