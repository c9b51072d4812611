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
    qkv_grad = _linear(tally, "qkv", layers["qkv"], rows, "ln_1", x_grad, p, p.stream)
    if qkv_grad:  # q, k and v are views of one c_attn output: the kernel saves that storage once
        dims_mha = Dims(**{**dims.__dict__, "kv_heads": dims.heads})
        _attention(tally, dims_mha, attn, p, gqa_in_kernel=True, softmax_fp32=False, output_is_projection_input=False)
    o_grad = _linear(tally, "o", layers["o"], rows, "attention", qkv_grad, p, p.compute)
    x_grad = _layer_norm(tally, rows, d, stream_needs_grad or o_grad, norms_train, p)
    fc_grad = _linear(tally, "up", layers["up"], rows, "ln_2", x_grad, p, p.stream)
    if fc_grad:  # GELU(tanh) = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))): x, 0.5x, tanh and 1 + tanh are saved
        tally.add("GELU intermediates", rows * f * 4, p.compute)
    _linear(tally, "down", layers["down"], rows, "GELU", fc_grad, p, p.compute)
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
    o_grad = _linear(tally, "o", layers["o"], rows, "attention", attention_grad, p, p.compute)
    if dropout and o_grad:
        tally.add("dropout masks", rows * d, 1 if device == "cuda" else p.compute)
    x_grad = _layer_norm(tally, rows, d, stream_needs_grad or o_grad, norms_train, p)
    up_grad = _linear(tally, "up", layers["up"], rows, "LayerNorm 1", x_grad, p, p.stream)
    if up_grad:
        tally.add("GELU inputs", rows * f, p.compute)
    down_grad = _linear(tally, "down", layers["down"], rows, "GELU", up_grad, p, p.compute)
    if dropout and down_grad:
        tally.add("dropout masks", rows * d, 1 if device == "cuda" else p.compute)
    _layer_norm(tally, rows, d, x_grad or down_grad, norms_train, p)
    return tally


# ----------------------------------------------------------------------------------------------------------------
# Reading a model after a method was applied
# ----------------------------------------------------------------------------------------------------------------
def _describe_linear(module: nn.Module) -> Linear:
    """A projection as the estimator sees it (:class:`Linear`): every method layer around it describes itself
    (:meth:`peftlab.methods.layers.AdapterLayer.describe`), down to the base: a plain or 4-bit weight."""
    description = Linear(0, 0)
    while isinstance(module, AdapterLayer):
        for name, value in module.describe().items():
            setattr(description, name, value)
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


def _dims(config: PretrainedConfig, batch_size: int, tokens: int, keys: int) -> Dims:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return Dims(
        batch=batch_size, tokens=tokens, keys=keys, hidden=hidden,
        ffn=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads, vocab=config.vocab_size,
    )  # fmt: skip


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
    family = family_of(base.config, needed_by="The memory estimator")
    layout = family.name
    p = Precision.of(precision)
    dims = _dims(base.config, batch_size, seq_len + extra_queries, seq_len + extra_queries + extra_keys)
    rows = dims.batch * dims.tokens
    dropout = layout == "bert" and base.config.hidden_dropout_prob > 0
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
        saved += rows * dims.hidden * 4 + rows * (4 if family_of(base.config).norm_kind == "rms" else 8)
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
