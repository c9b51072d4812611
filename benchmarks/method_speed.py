"""Is every peftlab method as fast as its reference? Step time of one training step against peft's, and how close
each step comes to the GPU's own matmul throughput.

    python benchmarks/method_speed.py                      # on a CUDA GPU: every row, bf16 autocast
    python benchmarks/method_speed.py --methods ia3,prefix  # some methods only
    python benchmarks/method_speed.py --quick               # a tiny Llama on the CPU, to try the script

Methods and their references: prompt tuning (``peft.PromptTuningConfig``), P-tuning (``PromptEncoderConfig``, MLP),
prefix tuning (``PrefixTuningConfig`` with the projection), IA3 (``IA3Config``), AdaLoRA (``AdaLoraConfig``, the
orthogonality term in the loss and the rank allocator after every step, on both sides), and QLoRA (peftlab's NF4
``Linear4bit`` from scratch against bitsandbytes' ``Linear4bit`` under peft's LoRA). Methods peft has no twin for
(LoRA-drop, Houlsby adapters, Freeze, BitFit) are refused with a message; LoRA itself is ``lora_speed.py``.

For each row both sides start from the same random-init base (one state dict) and hold the same trainable tensors
(copied across: the soft prompt, the prompt encoder, the prefix MLP, the IA3 vectors set to 1 + noise, AdaLoRA's P,
λ, Q, QLoRA's A and B), train with the same AdamW, and are timed as ``lora_speed.py`` times them
(``timing.timed_steps``: the device synchronised around every step, 3 blocks per side, alternating; the median of
all timed steps). Before timing, both sides' logits are compared on one batch.

Model FLOPs per step are counted from the shapes (``step_flops``): every matmul of the forward pass (2 FLOPs per
weight and token), its input gradient (the same again) and, for the trained weights, its weight gradient (the same
again), plus causal attention (QKᵀ and PV, half the T × T_k square, times 3 for forward and backward). Divided by
the step time they give model FLOP/s, held against the same GPU's measured 8192³ bf16 matmul in the same run.

Writes ``benchmarks/results/method_speed.json``: device, date, versions, the matmul ceiling, and one row per method
and model (settings, both step times, ``ratio = peftlab / peft``, FLOPs, FLOP/s and the fraction of the ceiling).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import date
from pathlib import Path

import peft
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab import env, models
from peftlab.methods import adalora, ia3, lora, prefix, prompt, qlora
from peftlab.timing import alternate, matmul_tflops, median, timed_steps, training_step

RESULTS = Path(__file__).resolve().parent / "results" / "method_speed.json"
METHODS = ("prompt", "ptuning", "prefix", "ia3", "adalora", "qlora")
#: peftlab methods with no twin to time against, and why.
NO_REFERENCE = {
    "lora": "LoRA is timed against peft by benchmarks/lora_speed.py.",
    "lora_drop": "peft has no LoRA-drop (its shared-LoRA layers): there is no reference step to time against.",
    "adapter": "peft 0.21 has no Houlsby bottleneck adapter: there is no reference step to time against.",
    "freeze": "Freeze (top-k blocks) is plain PyTorch, not a peft method: there is no reference step to time against.",
    "bitfit": "peft 0.21 has no BitFit: there is no reference step to time against.",
    "full": "full fine-tuning has no PEFT reference: there is no reference step to time against.",
}
VIRTUAL_TOKENS = 20
MODELS = (("smollm2-135m", 8, 512), ("llama-3.2-1b", 4, 1024))
ROWS = [{"method": m, "architecture": a, "batch_size": b, "seq_len": t} for a, b, t in MODELS for m in METHODS]
QUICK = [{"method": m, "architecture": "tiny-llama", "batch_size": 2, "seq_len": 16} for m in METHODS]
LLAMA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config_of(architecture: str):
    return models.tiny_config("llama") if architecture == "tiny-llama" else models.architecture_config(architecture)


def twin_bases(row: dict, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """Two copies of one random-init base: the same state dict on both sides."""
    config = config_of(row["architecture"])
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
        twin = AutoModelForCausalLM.from_config(config, dtype=dtype)
    twin.load_state_dict(base.state_dict())
    return base, twin


def settings_of(method: str, config) -> dict:
    """The row's method settings, the same on both sides."""
    heads = config.num_attention_heads
    d_kv = (getattr(config, "num_key_value_heads", None) or heads) * (config.hidden_size // heads)
    return {
        "prompt": {"num_virtual_tokens": VIRTUAL_TOKENS, "init": "random"},
        "ptuning": {"num_virtual_tokens": VIRTUAL_TOKENS, "encoder": "mlp", "encoder_hidden_size": config.hidden_size},
        "prefix": {"num_virtual_tokens": VIRTUAL_TOKENS, "projection": True, "encoder_hidden_size": 512,
                   "embedding_dim": d_kv},
        "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        "adalora": {"init_r": 12, "target_r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"],
                    "total_steps": 10000, "t_init": 0, "t_final": 0, "delta_t": 10, "orth_reg_weight": 0.5},
        "qlora": {"r": 16, "alpha": 32, "target_modules": "all-linear", "quant": "nf4", "double_quant": True,
                  "block_size": 64, "compute_dtype": "bf16", "base_dtype": "bf16", "adapters_dtype": "fp32"},
    }[method]  # fmt: skip


# -- twins, one builder per method: (peft model, peftlab model, step extras) -----------------------------------------
def prompt_twins(row, device, s):
    base, twin = twin_bases(row, device, torch.float32)
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=s["num_virtual_tokens"]))  # fmt: skip
    ours = prompt.apply(twin, prompt.PromptTuningConfig(s["num_virtual_tokens"]))
    with torch.no_grad():
        ours.soft_prompt.copy_(theirs.prompt_encoder["default"].embedding.weight)
    return theirs, ours


def ptuning_twins(row, device, s):
    base, twin = twin_bases(row, device, torch.float32)
    theirs = peft.get_peft_model(base, peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=s["num_virtual_tokens"], encoder_hidden_size=s["encoder_hidden_size"],
        encoder_reparameterization_type="MLP"))  # fmt: skip
    ours = prompt.apply(twin, prompt.PTuningConfig(s["num_virtual_tokens"], encoder="mlp",
                                                   encoder_hidden_size=s["encoder_hidden_size"]))  # fmt: skip
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())  # same names and shapes
    return theirs, ours


def prefix_twins(row, device, s):
    base, twin = twin_bases(row, device, torch.float32)
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=s["num_virtual_tokens"], prefix_projection=True,
        encoder_hidden_size=s["encoder_hidden_size"]))  # fmt: skip
    config = prefix.PrefixTuningConfig(
        s["num_virtual_tokens"],
        reparametrize=True,
        hidden_size=s["encoder_hidden_size"],
        embedding_dim=s["embedding_dim"],
    )
    ours = prefix.apply(twin, config)
    ours.prefix_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())  # same names and layout
    return theirs, ours


def ia3_twins(row, device, s):
    base, twin = twin_bases(row, device, torch.float32)
    theirs = peft.get_peft_model(base, peft.IA3Config(target_modules=s["target_modules"],
                                                      feedforward_modules=s["feedforward_modules"]))  # fmt: skip
    ours = ia3.apply(twin, ia3.IA3Config(tuple(s["target_modules"]), tuple(s["feedforward_modules"])))
    generator = torch.Generator().manual_seed(1)
    their_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, ia3.IA3Scaled):
                values = 1 + 0.1 * torch.randn(layer.ia3_l["default"].shape, generator=generator)
                layer.ia3_l["default"].copy_(values)
                their_l = their_modules[name].ia3_l["default"]
                their_l.copy_(values.reshape(their_l.shape))
    return theirs, ours


ADALORA_NAMES = {"lora_P": "lora_B", "lora_lambda": "lora_E", "lora_Q": "lora_A"}  # peftlab → peft


def adalora_twins(row, device, s):
    base, twin = twin_bases(row, device, torch.float32)
    theirs = peft.get_peft_model(base, peft.AdaLoraConfig(
        task_type="CAUSAL_LM", init_r=s["init_r"], target_r=s["target_r"], lora_alpha=s["alpha"],
        target_modules=s["target_modules"], total_step=s["total_steps"], tinit=s["t_init"], tfinal=s["t_final"],
        deltaT=s["delta_t"], orth_reg_weight=s["orth_reg_weight"]))  # fmt: skip
    config = adalora.AdaLoRAConfig(init_r=s["init_r"], target_r=s["target_r"], alpha=s["alpha"],
                                   target_modules=tuple(s["target_modules"]), total_steps=s["total_steps"],
                                   t_init=s["t_init"], t_final=s["t_final"], delta_t=s["delta_t"],
                                   orth_reg_weight=s["orth_reg_weight"])  # fmt: skip
    ours = adalora.apply(twin, config)
    generator = torch.Generator().manual_seed(1)
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                module, part = name.rsplit(".", 1)
                their = their_params[f"base_model.model.{module}.{ADALORA_NAMES[part]}.default"]
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
                their.copy_(param.view_as(their))
    return theirs, ours


def bitsandbytes_4bit(model: nn.Module, targets: list[str], compute_dtype: torch.dtype, double_quant: bool):
    """Replace the target linear layers of a model by bitsandbytes' NF4 ``Linear4bit`` (quantised from the same
    weights), as ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` would."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise RuntimeError("QLoRA's reference needs bitsandbytes (pip install bitsandbytes), which is not installed "
                           f"here ({error}).") from error  # fmt: skip
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            device = layer.weight.device
            quantised = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=double_quant,
                                          quant_type="nf4", device="meta")  # fmt: skip
            quantised.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=double_quant, blocksize=64)  # fmt: skip
            if layer.bias is not None:
                quantised.bias = nn.Parameter(layer.bias.data, requires_grad=False)
            model.set_submodule(name, quantised.to(device))  # .to quantises the weight
    model.is_loaded_in_4bit = True  # what peft reads to wrap bitsandbytes' 4-bit layers with its own LoRA layers
    return model


def qlora_twins(row, device, s):
    base, twin = twin_bases(row, device, torch.bfloat16)
    ours = qlora.apply(twin, qlora.QLoRAConfig(
        lora=lora.LoRAConfig(r=s["r"], alpha=s["alpha"], target_modules=lora.ALL_LINEAR), block_size=s["block_size"],
        double_quant=s["double_quant"], compute_dtype=torch.bfloat16))  # fmt: skip
    base = bitsandbytes_4bit(base, LLAMA_ALL_LINEAR, torch.bfloat16, s["double_quant"])
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=s["r"], lora_alpha=s["alpha"], target_modules=LLAMA_ALL_LINEAR,
                                                       task_type="CAUSAL_LM"))  # fmt: skip
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            layer.lora_A.float()  # peft keeps its adapters in fp32 over a 16-bit base (autocast_adapter_dtype)
            layer.lora_B.float()
            their = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(their.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(torch.randn_like(layer.lora_B["default"].weight) * 0.01)
            their.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    return theirs, ours


TWINS = {"prompt": prompt_twins, "ptuning": ptuning_twins, "prefix": prefix_twins, "ia3": ia3_twins,
         "adalora": adalora_twins, "qlora": qlora_twins}  # fmt: skip


def nf4_base_difference(theirs: nn.Module, ours: nn.Module) -> float | None:
    """The largest |peftlab's dequantised NF4 weight − bitsandbytes'| over the first quantised layer: 0 when the two
    hold the same 4-bit base."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    from peftlab.quant import dequantize_nf4

    name, layer = next(iter(qlora.quantized_layers(ours).items()))
    their = theirs.base_model.model.get_submodule(name.rsplit(".base_layer", 1)[0]).base_layer
    mine = dequantize_nf4(layer.weight).float()
    reference = bnb.functional.dequantize_4bit(their.weight.data, their.weight.quant_state).float()
    return (mine - reference.view_as(mine)).abs().max().item()


# -- steps -------------------------------------------------------------------------------------------------------------
def step_function(model: nn.Module, side: str, method: str, batch: dict, device: torch.device, s: dict):
    """One training step of a side (:func:`peftlab.timing.training_step`), and AdaLoRA's extras: peft adds the
    orthogonality term inside its forward pass, peftlab adds it to the loss; both allocate ranks after the step,
    counting steps across the timed blocks."""
    if method != "adalora":
        return training_step(model, batch)
    steps = itertools.count(1)
    if side == "peft":
        return training_step(model, batch, after_step=lambda _: model.base_model.update_and_allocate(next(steps)))
    allocator = adalora.RankAllocator(model)
    return training_step(model, batch,
                         loss_fn=lambda m, b: m(**b).loss + s["orth_reg_weight"] * adalora.orthogonality_loss(m),
                         after_step=lambda _: allocator.update_and_allocate(model, next(steps)))  # fmt: skip


def step_flops(model: nn.Module, row: dict, method: str) -> dict:
    """Model FLOPs of one training step, from the shapes of peftlab's model (see the module docstring)."""
    config = model.config
    batch, length = row["batch_size"], row["seq_len"]
    queries = length + (VIRTUAL_TOKENS if method in ("prompt", "ptuning") else 0)
    extra_keys = VIRTUAL_TOKENS if method == "prefix" else 0
    tokens = batch * queries
    frozen = trained = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | Conv1D):
            if module.weight.requires_grad:
                trained += module.weight.numel()
            else:
                frozen += module.weight.numel()
        elif isinstance(module, qlora.Linear4bit):
            frozen += module.in_features * module.out_features  # (a tied LM head is an nn.Linear: counted once)
        elif isinstance(module, adalora.AdaLoRALinear):
            trained += module.lora_P.numel() + module.lora_Q.numel()
    matmul = 2 * tokens * (frozen + trained) * 2 + 2 * tokens * trained  # forward, input gradient, weight gradient
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    keys = (queries + 1) / 2 + extra_keys  # causal: each query sees half the square on average, plus the prefix
    attention = 3 * 4 * batch * heads * head_dim * queries * keys * layers  # QKᵀ and PV; forward + 2× backward
    return {"flops": matmul + attention, "matmul_weights_frozen": frozen, "matmul_weights_trained": trained,
            "tokens": tokens, "attention_flops": attention}  # fmt: skip


def run(row: dict, device: torch.device, steps: int, warmup: int, rounds: int, ceiling: float | None) -> dict:
    method = row["method"]
    s = settings_of(method, config_of(row["architecture"]))
    theirs, ours = TWINS[method](row, device, s)
    theirs.train()
    ours.train()
    config = ours.config
    ids = torch.randint(0, config.vocab_size, (row["batch_size"], row["seq_len"]), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        mine, reference = ours(**batch).logits.float(), theirs(**batch).logits.float()
    logits_error = ((mine - reference).norm() / reference.norm()).item()
    if not logits_error < 5e-2:
        message = f"{method}: peftlab's logits differ from peft's by {logits_error:.3g} (relative)"
        if device.type == "cuda":
            raise AssertionError(message)
        # bitsandbytes' CPU path quantises the tiny --quick shapes (32 × 32) differently; real shapes agree
        print(f"warning: {message}; not checked on a CPU", flush=True)
    sides = {"peft": step_function(theirs, "peft", method, batch, device, s),
             "peftlab": step_function(ours, "peftlab", method, batch, device, s)}  # fmt: skip
    timed = alternate({name: (lambda f=f: timed_steps(f, device, steps, warmup)) for name, f in sides.items()}, rounds)
    peft_seconds, ours_seconds = median(timed["peft"]), median(timed["peftlab"])
    flops = step_flops(ours, row, method)
    result = {**row, "settings": s, "dtype": "bf16 autocast", "steps_per_side": steps * rounds,
              "peft_seconds": peft_seconds, "peftlab_seconds": ours_seconds, "ratio": ours_seconds / peft_seconds,
              "goal_met": ours_seconds / peft_seconds <= 1.05, "logits_relative_difference": logits_error,
              **flops, "peft_tflops": flops["flops"] / peft_seconds / 1e12,
              "peftlab_tflops": flops["flops"] / ours_seconds / 1e12,
              "peft_fraction_of_matmul": None if not ceiling else flops["flops"] / peft_seconds / 1e12 / ceiling,
              "peftlab_fraction_of_matmul": None if not ceiling else flops["flops"] / ours_seconds / 1e12 / ceiling,
              "device": env.device_name(device)}  # fmt: skip
    if method == "qlora":
        result["reference"] = "peft LoRA over bitsandbytes Linear4bit (nf4, double quant, bf16 compute)"
        result["nf4_base_max_abs_difference"] = nf4_base_difference(theirs, ours)
    return result


def versions() -> dict:
    found = env.package_versions()
    try:
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        found["bitsandbytes"] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama on any device, to try the script")
    parser.add_argument("--methods", type=lambda text: text.split(","), default=list(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}")  # fmt: skip
    parser.add_argument("--models", type=lambda text: text.split(","), default=None,
                        help="comma-separated architectures (default: every model of the rows)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block (3 blocks per side)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    for method in args.methods:
        if method in NO_REFERENCE:
            sys.exit(f"{method}: {NO_REFERENCE[method]} Choose from {', '.join(METHODS)}.")
        if method not in METHODS:
            sys.exit(f"Unknown method {method!r}: choose from {', '.join(METHODS)}.")
    device = env.resolve_device()
    if device.type != "cuda" and not args.quick:
        sys.exit("The speed comparison is meant for a CUDA GPU; use --quick to try the script on a CPU. "
                 "The results file is left as it was.")  # fmt: skip
    rows = [r for r in (QUICK if args.quick else ROWS) if r["method"] in args.methods
            and (args.models is None or r["architecture"] in args.models)]  # fmt: skip
    ceiling = matmul_tflops(device)
    print(f"dense bf16 matmul: {ceiling['tflops']} TFLOP/s ({ceiling['note']})", flush=True)
    record = {"device": env.device_name(device), "date": date.today().isoformat(), "versions": versions(),
              "goal": "ratio = peftlab / peft <= 1.05", "matmul_ceiling": ceiling, "rows": []}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        try:
            result = run(row, device, args.steps, args.warmup, rounds=3, ceiling=ceiling["tflops"])
        except Exception as error:  # one row's failure (bitsandbytes missing, say) is recorded, the rest still run
            print(f"{row['method']} on {row['architecture']} failed: {type(error).__name__}: {error}", flush=True)
            record["rows"].append({**row, "failed": f"{type(error).__name__}: {error}"[:1000]})
        else:
            record["rows"].append(result)
            fraction = result["peftlab_fraction_of_matmul"]
            print(f"{row['method']:>8} {row['architecture']:>13} b{row['batch_size']} T{row['seq_len']}: peft "
                  f"{result['peft_seconds'] * 1e3:8.1f} ms, peftlab {result['peftlab_seconds'] * 1e3:8.1f} ms, ratio "
                  f"{result['ratio']:.3f}, {result['peftlab_tflops']:.1f} TFLOP/s"
                  + (f" ({fraction:.1%} of matmul)" if fraction else ""), flush=True)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
        args.out.write_text(json.dumps(record, indent=1))  # after every row: a cut-off run keeps what it has


if __name__ == "__main__":
    main()
