"""Activations: the tensors a training step saves for backward, block by block, per model family; the logits and
the loss; the KV cache; a prompt or prefix encoder. Each method layer describes itself
(:meth:`peftlab.methods.layers.AdapterLayer.describe`), so this module knows families, not methods."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig

from peftlab.families import family_of, transformer_blocks
from peftlab.methods import prefix, prompt, targets
from peftlab.methods.layers import AdapterLayer

DEVICES = ("cuda", "cpu")


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
    adapter_bottleneck: int = 0  # trained bottleneck adapters after the projection (Houlsby): their total width
    fusion_adapters: int = 0  # AdapterFusion over N frozen adapters after the projection: N
    fusion_bottleneck: int = 0  # and their total width
    lora_dropped: int = 0  # applied LoRA adapters whose A reads a dropped copy of x (dropout > 0, in training)
    lora_undropped: bool = True  # whether an applied adapter reads x itself


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
    padded: bool = False  # the batch has padding: transformers passes an explicit attention mask

    @property
    def explicit_mask(self) -> bool:
        """Whether the attention kernel gets an explicit mask: a prefix (keys the queries do not have) or padding."""
        return self.keys > self.tokens or self.padded


@dataclass
class Precision:
    """Byte sizes of what the forward pass computes in, and whose kernels run it (``cuda`` or ``cpu``)."""

    stream: int  # the residual stream between blocks
    compute: int  # matmul inputs and outputs
    autocast: bool  # bf16-mixed: matmuls cast their (fp32) inputs to bf16 copies
    device: str = "cuda"

    @classmethod
    def of(cls, precision: str, device: str = "cuda") -> Precision:
        if precision == "fp32":
            return cls(stream=4, compute=4, autocast=False, device=device)
        if precision == "bf16-mixed":
            return cls(stream=4, compute=2, autocast=True, device=device)
        return cls(stream=2, compute=2, autocast=False, device=device)

    def mask_bytes(self, dtype_bytes: int) -> int:
        """Bytes per element of what dropout keeps for backward. On CUDA ``F.dropout`` is ``native_dropout``, a
        fused kernel that saves a one-byte boolean mask; on a CPU it computes ``x * noise`` with a scaled noise
        tensor of x's dtype, and saves that (``is_fused_kernel_acceptable`` in ATen's Dropout.cpp)."""
        return 1 if self.device == "cuda" else dtype_bytes


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

    **LoRA dropout** (``B(A(dropout(x)))``, p > 0, in training): each adapter's dropout makes a new tensor, so A
    saves that dropped copy (rows · d_in in x's dtype, or its bf16 copy under autocast) in place of x, shared with
    nobody; and where x needs a gradient the dropout itself keeps its mask (``Precision.mask_bytes``: one byte on
    CUDA). Under autocast an fp32 x was copied to bf16 for A anyway, so there only the mask is new; a bf16 x (the
    attention output into o, the SwiGLU product into down) gains the copy and the mask. Where x needs no gradient
    (the first block's q, k, v over frozen embeddings) no mask is kept.
    """
    shared = None if p.autocast and input_bytes != p.compute else source
    x_bytes = p.compute if p.autocast else input_bytes
    if layer.weight_trains:
        tally.add("inputs of trained projections", rows * layer.in_features, x_bytes, key=shared)
    if p.autocast and (input_needs_grad or layer.weight_trains):
        tally.add("bf16 weight copies (autocast)", layer.in_features * layer.out_features, p.compute)
    output_needs_grad = input_needs_grad or layer.weight_trains or layer.bias_trains
    if layer.lora_rank:
        if layer.lora_dropped and input_needs_grad:
            tally.add("LoRA dropout masks", layer.lora_dropped * rows * layer.in_features, p.mask_bytes(input_bytes))
        if layer.lora_a_trains:
            if layer.lora_dropped:
                tally.add("LoRA dropped inputs", layer.lora_dropped * rows * layer.in_features, x_bytes)
            if layer.lora_undropped:
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
    if layer.fusion_adapters:
        _fusion(tally, layer, rows, input_needs_grad or layer.weight_trains, p)
        output_needs_grad = True
    return output_needs_grad


def _fusion(tally: Tally, layer: Linear, rows: int, h_needs_grad: bool, p: Precision) -> None:
    """What AdapterFusion over N frozen adapters saves after a projection with output h (d per token):
    s = softmax((h W_Q)·(z_n W_K)), o = h + (Σ s_n z_n) W_V (:mod:`peftlab.methods.fusion`). The trained W_Q, W_K
    and W_V save their inputs: h, the stacked adapter outputs z (N·d) and the mix Σ s_n z_n (d); the score product
    saves both its operands, z W_K (N·d) and h W_Q (d); the softmax its output s (N), which the mix shares, as it
    shares z. So (2N + 3)·d + N per token. The adapters are frozen: their W_down saves nothing, and their
    non-linearity keeps its m numbers only where h needs a gradient (below a trained block)."""
    n, d = layer.fusion_adapters, layer.out_features
    tally.add("fusion: h, h W_Q and the mix", 3 * rows * d, p.compute)
    tally.add("fusion: adapter outputs z and z W_K", 2 * n * rows * d, p.compute)
    tally.add("fusion: attention weights", n * rows, p.compute)
    if h_needs_grad:
        tally.add("adapter bottleneck", rows * layer.fusion_bottleneck, p.compute)
    if p.autocast:
        tally.add("bf16 weight copies (autocast)", 3 * d * d, 2)
        if h_needs_grad:
            tally.add("bf16 weight copies (autocast)", 2 * d * layer.fusion_bottleneck, 2)


def _attention(tally: Tally, dims: Dims, attn: str, p: Precision, gqa_in_kernel: bool, softmax_fp32: bool,
               output_is_projection_input: bool, fused_qkv: bool = False, dropout: float = 0.0,
               values_fp32: bool = False, grads: tuple[bool, bool, bool] = (True, True, True)) -> None:  # fmt: skip
    """The attention kernel's saved tensors. SDPA (flash / memory-efficient): q, k, v, the output and the log-sum-exp
    (fp32, B·h·T). Where q comes from its own projection (Llama, BERT: ``view(B, T, h, d).transpose(1, 2)``) the
    fused kernels write the output in that token-major layout, and the output projection reads that very storage:
    one tensor, counted once (``key="attention"``, the projection's source). Eager: q and the keys and values
    repeated to every head, and the B·h·T·T_k probabilities (fp32, plus their bf16 copy under autocast); its output
    is a copy of its own.

    ``fused_qkv`` (GPT-2): q, k and v are views of one c_attn output, and the KV cache that transformers keeps also
    in training (``DynamicCache.update`` concatenates onto an empty tensor) hands back *copies* of k and v. So SDPA
    keeps q's storage — all of the fused output, rows · 3d — and the two copies; its output is read by c_proj in
    place (measured on a CPU, transformers 5.24, and it closes the H200 rows: see ``_gpt2_block``). Eager attention
    multiplies with ``torch.matmul``, which folds the strided 4-d q into a contiguous copy: q, k and v are three
    tensors of their own there, as in the other families.

    ``values_fp32``: q, k and v come out of the projections in fp32 under autocast ((IA)³ scaling c_attn's output
    by its fp32 vector). SDPA then saves autocast's bf16 copies (not the fused storage), and in eager attention the
    probabilities stay fp32 up to the product with V (``attn_weights.type(value.dtype)``), so dropout keeps an fp32
    mask on a CPU.

    ``grads``: whether q, k and v need a gradient. A fused kernel saves all three if any does; eager attention saves
    only what each product's backward needs: q for k's gradient, k for q's, V and the probabilities for the
    scores' gradient, the probabilities it multiplies V by for V's (the first block of LoRA on q and v, over frozen
    embeddings: k needs none, so q is not kept).

    An explicit mask (``dims.explicit_mask``: a prefix, or a padded batch) is kept by the memory-efficient kernel as
    a B·T·T_k tensor of the compute dtype in every layer (each call converts transformers' mask anew): measured on an
    H200, Llama-3.2-1B 2 × 1024 padded saves 4 MiB more per layer than the repeated keys and values account for.

    ``dropout`` (attention dropout, in training): the fused CUDA kernels keep only their RNG seed and offset; eager
    attention keeps the dropout's mask of every probability and the dropped copy, which the product with V saves in
    place of the probabilities it would have read. (SDPA with dropout on a CPU leaves the fused kernel for the math
    path: not modelled.)"""
    rows, key_rows = dims.batch * dims.tokens, dims.batch * dims.keys
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    if attn == "sdpa":
        if fused_qkv and not values_fp32:
            tally.add("attention q, k, v (the fused c_attn output)", rows * (q + 2 * kv), p.compute)
            tally.add("attention k, v (KV cache copies)", key_rows * 2 * kv, p.compute)
        else:
            kv_width = kv if gqa_in_kernel else q
            tally.add("attention q, k, v", rows * q + key_rows * 2 * kv_width, p.compute)
        tally.add("attention output", rows * q, p.compute, key="attention" if output_is_projection_input else None)
        tally.add("attention log-sum-exp", dims.batch * dims.heads * dims.tokens, 4)
        if dims.explicit_mask:  # a prefix or padding: the kernel gets (and keeps) an explicit B·T·T_k mask
            tally.add("attention mask", dims.batch * dims.tokens * dims.keys, p.compute)
        return
    q_grad, k_grad, v_grad = grads
    scores_grad = q_grad or k_grad
    tally.add("attention q, k, v", (rows * q if k_grad else 0) + key_rows * q * (int(q_grad) + int(scores_grad)),
              p.compute)  # fmt: skip
    probabilities = dims.batch * dims.heads * dims.tokens * dims.keys
    softmax_bytes = 4 if softmax_fp32 or p.autocast else p.compute  # Llama upcasts; autocast runs softmax in fp32
    copied = softmax_bytes != p.compute  # cast back to bf16 for the product with V
    if scores_grad or (v_grad and not copied and not dropout):  # the softmax output, for its own backward / for V's
        tally.add("attention probabilities" + (" (fp32 softmax)" if softmax_bytes == 4 else ""), probabilities,
                  softmax_bytes)  # fmt: skip
    if dropout and scores_grad:
        tally.add("attention dropout masks", probabilities, p.mask_bytes(4 if values_fp32 else p.compute))
    if v_grad and (copied or dropout):  # what multiplies V: the bf16 copy, or the dropped copy in its place
        tally.add("attention probabilities (bf16 copy)" if copied else "attention probabilities (dropped)",
                  probabilities, p.compute)  # fmt: skip


def _llama_block(dims: Dims, layers: dict[str, Linear], norms_train: bool, stream_needs_grad: bool, attn: str,
                 p: Precision, gqa_in_kernel: bool, attention_dropout: float = 0.0) -> Tally:  # fmt: skip
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
        prefix = dims.keys > dims.tokens  # a trained prefix's keys and values need gradients
        _attention(tally, dims, attn, p, gqa_in_kernel, softmax_fp32=True, output_is_projection_input=True,
                   dropout=attention_dropout, grads=(q_grad, k_grad or prefix, v_grad or prefix))  # fmt: skip
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


@dataclass
class Dropouts:
    """The dropout probabilities a family's config sets, in training: after the embeddings, after each block's
    output projections (GPT-2's ``resid_pdrop``, BERT's ``hidden_dropout_prob``) and on the attention
    probabilities."""

    embeddings: float = 0.0
    hidden: float = 0.0
    attention: float = 0.0

    @classmethod
    def of(cls, config: PretrainedConfig, layout: str) -> Dropouts:
        if layout == "gpt2":
            return cls(config.embd_pdrop, config.resid_pdrop, config.attn_pdrop)
        if layout == "bert":
            return cls(config.hidden_dropout_prob, config.hidden_dropout_prob, config.attention_probs_dropout_prob)
        return cls(attention=getattr(config, "attention_dropout", 0.0) or 0.0)


def _gpt2_block(dims: Dims, layers: dict[str, Linear], norms_train: bool, stream_needs_grad: bool, attn: str,
                p: Precision, dropouts: Dropouts | None = None, activation: str = "gelu_new") -> Tally:  # fmt: skip
    """Saved tensors of one GPT-2 block (LayerNorm → fused q,k,v → attention → residual → LayerNorm → GELU MLP).

    GELU(tanh), ``0.5·x·(1 + tanh(√(2/π)(x + 0.044715·x³)))``, saves x (for ``pow``), tanh, 1 + tanh and 0.5·x.
    On CUDA under autocast ``pow`` is on autocast's fp32 list, so it saves an fp32 copy of x, and everything after
    it (tanh, 1 + tanh, the product) is fp32 too: 4 + 4 + 4 + 2 bytes per element instead of 4 × 2 (on a CPU
    ``pow`` is not on the list). The dropouts after c_proj (``resid_pdrop``) keep a mask each where their input
    needs a gradient. With the fused q, k, v and the KV cache's copies (``_attention``), these close the GPT-2 rows
    of the H200 reading: 12 layers × 8 × 512 tokens, measured − estimated saved bytes were 28.08 d (full) and 30.00 d
    (LoRA) bytes per token per layer, d = 768; the terms give 24 d (GELU) + 2 d (two masks) + 2 d (cache copies
    less c_proj's input, which is the kernel's output) + 1/12 d (the embedding dropout's mask, full only) = 28.08 d,
    and 24 d + 2 d + 4 d = 30 d where c_proj is frozen."""
    dropouts = dropouts or Dropouts()
    tally = Tally()
    rows, d, f = dims.batch * dims.tokens, dims.hidden, dims.ffn
    x_grad = _layer_norm(tally, rows, d, stream_needs_grad, norms_train, p)
    qkv_grad = _linear(tally, "qkv", layers["qkv"], rows, "ln_1", x_grad, p, p.stream)
    if qkv_grad:
        dims_mha = Dims(**{**dims.__dict__, "kv_heads": dims.heads})
        _attention(tally, dims_mha, attn, p, gqa_in_kernel=True, softmax_fp32=False,
                   output_is_projection_input=attn == "sdpa", fused_qkv=True, dropout=dropouts.attention,
                   values_fp32=p.autocast and layers["qkv"].ia3 == "output")  # fmt: skip
    o_grad = _linear(tally, "o", layers["o"], rows, "attention", qkv_grad, p, p.compute)
    if dropouts.hidden and o_grad:
        tally.add("dropout masks", rows * d, p.mask_bytes(p.compute))
    x_grad = _layer_norm(tally, rows, d, stream_needs_grad or o_grad, norms_train, p)
    fc_grad = _linear(tally, "up", layers["up"], rows, "ln_2", x_grad, p, p.stream)
    gelu_input = p.compute
    if fc_grad:  # GELU(tanh): x, tanh, 1 + tanh and 0.5·x are saved (see above)
        if p.autocast and p.device == "cuda" and activation == "gelu_new":
            tally.add("GELU intermediates (pow in fp32 under CUDA autocast)", rows * f, 4 + 4 + 4 + 2)
            gelu_input = 4  # the product is fp32: c_proj's autocast makes its own bf16 copy
        else:
            tally.add("GELU intermediates", rows * f * 4, p.compute)
    down_grad = _linear(tally, "down", layers["down"], rows, "GELU", fc_grad, p, gelu_input)
    if dropouts.hidden and down_grad:
        tally.add("dropout masks", rows * d, p.mask_bytes(p.compute))
    return tally


def _bert_block(dims: Dims, layers: dict[str, Linear], norms_train: bool, stream_needs_grad: bool, attn: str,
                p: Precision, dropouts: Dropouts | None = None, norm_adapter: int = 0) -> Tally:  # fmt: skip
    """Saved tensors of one BERT block (q, k, v → attention → dense → LayerNorm(+x) → GELU FFN → LayerNorm(+x)).
    Dropout in training saves a mask per element after each dense layer: one byte on CUDA (a fused kernel's boolean
    mask), an element of the layer's output dtype on a CPU (there dropout multiplies by a scaled mask).

    ``norm_adapter``: the width of Pfeiffer's trained adapters around the last LayerNorm, LN(s + g(LN(s))). The
    adapter saves the first pass's output (its W_down's input, d per token) and its bottleneck (m), and the second
    pass of the LayerNorm saves its input and statistics, as any LayerNorm with a gradient does."""
    dropouts = dropouts or Dropouts()
    tally = Tally()
    rows, d, f = dims.batch * dims.tokens, dims.hidden, dims.ffn
    q_grad, k_grad, v_grad = (
        _linear(tally, key, layers[key], rows, "block input", stream_needs_grad, p, p.stream) for key in "qkv"
    )
    attention_grad = q_grad or k_grad or v_grad or dims.keys > dims.tokens
    if attention_grad:
        dims_mha = Dims(**{**dims.__dict__, "kv_heads": dims.heads})
        prefix = dims.keys > dims.tokens
        _attention(tally, dims_mha, attn, p, gqa_in_kernel=True, softmax_fp32=False, output_is_projection_input=True,
                   dropout=dropouts.attention, grads=(q_grad, k_grad or prefix, v_grad or prefix))  # fmt: skip
    o_grad = _linear(tally, "o", layers["o"], rows, "attention", attention_grad, p, p.compute)
    if dropouts.hidden and o_grad:
        tally.add("dropout masks", rows * d, p.mask_bytes(p.compute))
    x_grad = _layer_norm(tally, rows, d, stream_needs_grad or o_grad, norms_train, p)
    up_grad = _linear(tally, "up", layers["up"], rows, "LayerNorm 1", x_grad, p, p.stream)
    if up_grad:
        tally.add("GELU inputs", rows * f, p.compute)
    down_grad = _linear(tally, "down", layers["down"], rows, "GELU", up_grad, p, p.compute)
    if dropouts.hidden and down_grad:
        tally.add("dropout masks", rows * d, p.mask_bytes(p.compute))
    _layer_norm(tally, rows, d, x_grad or down_grad, norms_train, p)
    if norm_adapter:
        tally.add("adapter inputs", rows * d, p.compute)
        tally.add("adapter bottleneck", rows * norm_adapter, p.compute)
        if p.autocast:
            tally.add("bf16 weight copies (autocast)", 2 * d * norm_adapter, 2)
        _layer_norm(tally, rows, d, True, norms_train, p)
    return tally


# ----------------------------------------------------------------------------------------------------------------
# Reading a model after a method was applied
# ----------------------------------------------------------------------------------------------------------------
def _lora_dropped(layer: AdapterLayer) -> int:
    """How many of a LoRA layer's applied adapters drop their input: ``layer.lora_dropout[name]`` is an
    ``nn.Dropout`` with p > 0 (LoRA and QLoRA make an ``nn.Identity`` for dropout 0), read from the layer itself as
    every other field is, so that a model built with dropout is estimated with it. An ``nn.Dropout`` in eval mode
    drops nothing: the estimate is of a training step, so the module's mode is not consulted."""
    dropouts = getattr(layer, "lora_dropout", None)
    if not isinstance(dropouts, nn.ModuleDict):
        return 0
    return sum(1 for name in layer.applied() if isinstance(dropouts[name], nn.Dropout) and dropouts[name].p > 0)


def _describe_linear(module: nn.Module) -> Linear:
    """A projection as the estimator sees it (:class:`Linear`): every method layer around it describes itself
    (:meth:`peftlab.methods.layers.AdapterLayer.describe`), down to the base: a plain or 4-bit weight."""
    description = Linear(0, 0)
    described = set()  # a layer wrapping another (AdapterFusion's around adapters) speaks for it: outer wins
    while isinstance(module, AdapterLayer):
        for name, value in module.describe().items():
            if name not in described:
                setattr(description, name, value)
                described.add(name)
        dropped = _lora_dropped(module)
        if dropped:
            description.lora_dropped = dropped
            description.lora_undropped = dropped < len(module.applied())
        module = module.base_layer
    description.in_features, description.out_features = targets.in_out(module)
    weight = module.weight
    description.weight_trains = isinstance(weight, nn.Parameter) and weight.requires_grad  # a 4-bit weight never
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


def _dims(config: PretrainedConfig, batch_size: int, tokens: int, keys: int, padded: bool = False) -> Dims:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return Dims(
        batch=batch_size, tokens=tokens, keys=keys, hidden=hidden, padded=padded,
        ffn=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads, vocab=config.vocab_size,
    )  # fmt: skip


def sdpa_falls_back_to_math(dims: Dims, precision: Precision, device: str) -> bool:
    """On CUDA, SDPA in fp32 with grouped-query attention has no fused kernel (flash needs 16-bit inputs, the
    memory-efficient kernel has no GQA), so PyTorch runs the math path, which saves what eager attention saves. The
    CPU's flash kernel takes fp32 and GQA. With a prefix the call carries an explicit mask, transformers repeats k
    and v to every head itself (it hands GQA to the kernel only without a mask), and the memory-efficient kernel
    takes the fp32 inputs and the mask: no fallback (measured on an H100: SmolLM2, prefix tuning, 4 × 512). A padded
    batch has the prefix's effect: its mask is explicit too (measured on an H200, Llama-3.2-1B and Qwen2.5-0.5B in
    bf16-mixed: k and v repeated to every head and a mask per layer, exactly 256 and 384 MiB more saved)."""
    grouped_in_kernel = dims.kv_heads < dims.heads and not dims.explicit_mask
    return device == "cuda" and precision.compute == 4 and grouped_in_kernel


def activation_bytes_per_layer(model: nn.Module, batch_size: int, seq_len: int, precision: str, attn: str,
                               grad_checkpointing: bool, device: str = "cuda",
                               padded: bool = False) -> tuple[list[int], Dims]:  # fmt: skip
    """Saved-for-backward bytes of each block (see :func:`estimate`), and the dimensions they were computed for.
    ``padded``: the batch has padding, so the attention kernel gets an explicit mask (:func:`_attention`)."""
    base, extra_queries, extra_keys = _base_of(model)
    family = family_of(base.config, needed_by="The memory estimator")
    layout = family.name
    p = Precision.of(precision, device)
    dims = _dims(base.config, batch_size, seq_len + extra_queries, seq_len + extra_queries + extra_keys, padded)
    rows = dims.batch * dims.tokens
    dropouts = Dropouts.of(base.config, layout)
    activation = getattr(base.config, "activation_function", "gelu_new")
    embeddings_train = any(param.requires_grad for name, param in base.named_parameters() if "embed" in name)
    stream_grad = extra_queries > 0 or embeddings_train  # a soft prompt or trained embeddings feed the first block
    per_layer = []
    for block in transformer_blocks(base)[1]:
        layers = {role: _describe_linear(block.get_submodule(path)) for role, path in family.projections.items()}
        norms_train = any(param.requires_grad for param in block.get_submodule(family.norm).parameters())
        block_trains = any(param.requires_grad for param in block.parameters()) or extra_keys > 0
        if grad_checkpointing:
            per_layer.append(rows * dims.hidden * p.stream if (stream_grad or block_trains) else 0)
        elif layout == "llama":
            kernel = "eager" if attn == "sdpa" and sdpa_falls_back_to_math(dims, p, device) else attn
            gqa = kernel == "sdpa" and not dims.explicit_mask  # with a mask transformers repeats k and v itself
            per_layer.append(_llama_block(dims, layers, norms_train, stream_grad, kernel, p, gqa,
                                          dropouts.attention).total)  # fmt: skip
        elif layout == "gpt2":
            per_layer.append(_gpt2_block(dims, layers, norms_train, stream_grad, attn, p, dropouts, activation).total)
        else:
            norm_adapter = sum(module.describe().get("norm_adapter_bottleneck", 0) for module in block.modules()
                               if isinstance(module, AdapterLayer))  # fmt: skip
            per_layer.append(_bert_block(dims, layers, norms_train, stream_grad, attn, p, dropouts, norm_adapter).total)
        stream_grad = stream_grad or block_trains
    return per_layer, dims


def embedding_dropout_bytes(model: nn.Module, dims: Dims, precision: str, device: str) -> int:
    """The dropout before the first block: GPT-2 drops ``wte(ids) + wpe(positions)`` (``embd_pdrop``), BERT its
    embedding LayerNorm's output (``hidden_dropout_prob``). Where that tensor needs a gradient (trained embeddings,
    BERT's embedding LayerNorm training, or a soft prompt in the sum), the dropout keeps its mask of the B·T·d
    tensor (``Precision.mask_bytes``: one byte on CUDA; on a CPU the dtype of the sum, fp32 out of LayerNorm under
    autocast)."""
    base, extra_queries, _ = _base_of(model)
    layout = family_of(base.config).name
    if layout not in ("gpt2", "bert") or not Dropouts.of(base.config, layout).embeddings:
        return 0
    names = ("wte", "wpe") if layout == "gpt2" else ("embeddings",)
    embeddings_train = any(param.requires_grad for name, param in base.named_parameters()
                           if any(f".{part}." in f".{name}" for part in names))  # fmt: skip
    if not (embeddings_train or extra_queries):
        return 0
    p = Precision.of(precision, device)
    dtype_bytes = 4 if layout == "bert" and p.autocast else p.stream
    return dims.batch * dims.tokens * dims.hidden * p.mask_bytes(dtype_bytes)


def kv_cache_bytes(model: nn.Module, dims: Dims, precision: str, attn: str, device: str) -> int:
    """A Llama-style model called with ``use_cache=True`` (the default, also in training) keeps every layer's keys
    and values in a ``DynamicCache`` until the output is dropped: 2·L·B·T·d_kv numbers in the stream dtype. Where the
    attention kernel saves those very tensors for backward (SDPA's fused kernels in pure fp32 or bf16), the cache
    costs nothing more; under autocast, in eager attention and in the math fallback it holds copies of its own.
    Activation checkpointing turns the cache off."""
    base, _, _ = _base_of(model)
    if family_of(base.config).name != "llama":
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


#: The losses the estimator knows (``Setup.loss``): transformers' own ``ForCausalLMLoss`` (an fp32 copy of the
#: logits, cross-entropy in fp32), cross-entropy on the 16-bit logits as they are, and a chunked loss.
LOSSES = ("transformers", "bf16", "chunked")


def logits_bytes(model: nn.Module, dims: Dims, precision: str, stream_grad: bool, loss: str = "transformers",
                 chunk_tokens: int = 1024, head_quantised: bool = False) -> dict[str, int]:  # fmt: skip
    """The final norm, the LM head and the loss: what they save, and what lives only for a moment.

    ``loss="transformers"`` (the default, transformers' ``ForCausalLMLoss``: ``logits.float()``, then
    cross-entropy). Saved: the final RMSNorm's input; the LM head's input when the head trains (tied embeddings
    train in full fine-tuning) and, under autocast, its bf16 weight copy; the fp32 log-softmax that cross-entropy
    keeps (4 bytes per logit). Short-lived, at the end of the forward pass: the logits (in the compute dtype) and
    their fp32 copy for the loss; at the start of backward: the gradients of the log-probabilities and of the
    logits, two fp32 B·T·V tensors (8 bytes per logit; measured on an H100, the larger of the two in every
    benchmark row).

    ``loss="bf16"``: cross-entropy on the 16-bit logits without the upcast (pure bf16 or a quantised base; under
    autocast ``log_softmax`` is on the fp32 list, so there it cannot be had). The log-softmax is saved in bf16 (2
    bytes per logit), no fp32 copy is made, and backward's two gradients are bf16 (4 bytes per logit).

    ``loss="chunked"``: the head and the loss computed over chunks of ``chunk_tokens`` tokens, each inside an
    activation checkpoint (torchtune's chunked cross-entropy; Liger's fused linear cross-entropy holds the same
    B·T·d, as the input's gradient, computed in the forward pass). Autograd keeps only the final hidden state
    (B·T·d in the stream dtype); at most one chunk's logits are alive: in the forward pass its logits, their fp32
    copy and log-softmax (compute + 4 + 4 bytes per logit of the chunk), in backward the chunk recomputed, its
    log-softmax and the two fp32 gradients (4 + 8). Under autocast the head's bf16 weight copy is made per chunk
    and lives as long as the chunk does.

    ``head_quantised``: a frozen 4-bit head (``Setup.quantise_head``) saves nothing more (as bitsandbytes'
    ``MatMul4Bit`` and peftlab's ``Linear4bit``, it dequantises again in backward), but its dequantised V·d bf16
    weight lives beside the logits during the head's matmul, forward and backward. (Derived, not measured.)
    """
    base, _, _ = _base_of(model)
    rows = dims.batch * dims.tokens
    p = Precision.of(precision)
    if base.get_output_embeddings() is None:  # an encoder: tiny logits, but the embedding LayerNorm and the pooler
        return {"saved": _encoder_ends_saved_bytes(base, dims, p), "forward": 0, "backward": 0}
    head = base.get_output_embeddings().weight
    head_trains = bool(getattr(head, "requires_grad", False))
    head_numel = dims.vocab * dims.hidden
    logits = (min(chunk_tokens, rows) if loss == "chunked" else rows) * dims.vocab  # logits alive at once
    dequantised = head_numel * 2 if head_quantised else 0
    saved = 0
    rms = family_of(base.config).norm_kind == "rms"  # HF's RMSNorm upcasts; LayerNorm is fp32 under autocast
    if stream_grad:  # the final norm: RMSNorm keeps its fp32 input and 1/rms, LayerNorm its input, mean and 1/σ
        saved += rows * dims.hidden * (4 if rms or p.autocast else p.stream) + rows * (4 if rms else 8)
    final_norm = [param for name, param in base.named_parameters() if name.endswith("norm.weight")
                  and ".layers." not in f".{name}"]  # fmt: skip
    if rms and any(param.requires_grad for param in final_norm):  # its weight's gradient needs the normalised x
        saved += rows * dims.hidden * p.stream
    if loss == "chunked":
        saved += rows * dims.hidden * p.stream  # the checkpoints' input
        weight_copy = head_numel * 2 if p.autocast and not head_quantised else 0
        forward = logits * (p.compute + (4 if p.compute != 4 else 0) + 4) + max(weight_copy, dequantised)
        backward = logits * (4 + 8) + max(weight_copy, dequantised)
        return {"saved": saved, "forward": forward, "backward": backward}
    if head_trains:
        saved += rows * dims.hidden * (p.compute if p.autocast else p.stream)
    if p.autocast and (stream_grad or head_trains):
        saved += head.numel() * 2
    if loss == "bf16":
        saved += logits * 2
        return {"saved": saved, "forward": logits * p.compute + dequantised,
                "backward": max(logits * 4, logits * p.compute + dequantised)}  # fmt: skip
    saved += logits * 4
    forward = logits * p.compute + max(logits * 4 if p.compute != 4 else 0, dequantised)
    backward = max(logits * 8, logits * p.compute + dequantised)
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
