"""How right is the memory estimate? Estimate against measured peak on a CUDA GPU, row by row, with two public
calculators on the same rows.

    python benchmarks/memory_accuracy.py              # every row, each in a fresh process (an H100: ~4 minutes)
    python benchmarks/memory_accuracy.py --quick      # four rows, to try the script
    python benchmarks/memory_accuracy.py --estimate   # recompute the estimate columns of the results file (CPU)

Models are random-init (memory does not depend on the weights' values): SmolLM2-135M and a Llama-3.2-1B-shaped
model. Each row runs in its own process (nothing of the previous row stays allocated) and trains 3 optimizer steps
on one random batch; ``torch.cuda.max_memory_allocated`` is read in each phase of each step (forward, backward,
optimizer step) and the peak is the largest. The CUDA context is recorded beside it.

The anchors, re-implemented from their public sources:

* **accelerate** (``accelerate estimate-memory``, ``estimate_training_usage``): the largest of model, gradients,
  optimizer and step sizes, for the whole model at batch 1: 4× the fp32 size in fp32, 2× the 16-bit size in bf16.
  No activations, no PEFT.
* **gpu_poor** (RahulSChand/gpu_poor, ``src/App.js``, ``getAllComputedData`` for training): weights + gradients and
  optimizer + an activation formula per layer, scaled by 0.15 with checkpointing; its 650 MB "CUDA + other overhead"
  is left out here, since ``max_memory_allocated`` does not see the CUDA context either. Full, LoRA and QLoRA only.

Writes ``benchmarks/results/memory_accuracy.json``: device, date, versions, and one row per configuration with its
settings, ``estimate_bytes``, ``measured_bytes``, the anchors' figures and each relative error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab import env, memory, models
from peftlab.methods import apply_method, qlora
from peftlab.methods.lora import LoRAConfig

RESULTS = Path(__file__).resolve().parent / "results" / "memory_accuracy.json"
MiB = 2**20


def row(arch, method, batch, seq, precision="bf16-mixed", optimizer="adamw", checkpointing=False, attn="sdpa"):
    return {"architecture": arch, "method": method, "batch_size": batch, "seq_len": seq, "precision": precision,
            "optimizer": optimizer, "grad_checkpointing": checkpointing, "attn_implementation": attn}  # fmt: skip


SMOL, ONE_B = "smollm2-135m", "llama-3.2-1b"
ROWS = [
    # SmolLM2-135M: methods x precision x attention x checkpointing
    *[row(SMOL, "full", 4, 512, p, attn=a, checkpointing=c) for p in ("fp32", "bf16-mixed") for a in ("sdpa", "eager")
      for c in (False, True)],
    *[row(SMOL, "lora", 8, 512, p, attn=a) for p in ("bf16-mixed", "bf16") for a in ("sdpa", "eager")],
    *[row(SMOL, m, 8, 512) for m in ("ia3", "adapter", "prompt", "prefix", "freeze")],
    row(SMOL, "lora", 8, 512, checkpointing=True),
    row(SMOL, "full", 4, 512, optimizer="sgd-momentum"),
    row(SMOL, "qlora", 8, 512, "nf4"),
    # a 1.2B Llama: where weights and optimizer states weigh more
    row(ONE_B, "full", 1, 1024), row(ONE_B, "full", 1, 1024, checkpointing=True),
    row(ONE_B, "full", 2, 1024, "bf16"),
    row(ONE_B, "lora", 2, 1024), row(ONE_B, "lora", 2, 1024, attn="eager"),
    row(ONE_B, "lora", 4, 1024, "bf16", checkpointing=True),
    row(ONE_B, "qlora", 2, 1024, "nf4"),
]  # fmt: skip
QUICK = [ROWS[0], ROWS[8], ROWS[-4], ROWS[-1]]


def build(settings: dict) -> torch.nn.Module:
    """The random-init model of a row, on the GPU, with its method applied."""
    config = models.architecture_config(settings["architecture"])
    dtype = torch.float32 if settings["precision"] in ("fp32", "bf16-mixed") else torch.bfloat16
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=settings["attn_implementation"],
                                                 dtype=dtype)  # fmt: skip
    if settings["method"] == "qlora":
        adapters = LoRAConfig(r=8, alpha=16, target_modules="all-linear")
        double_quant = settings["precision"] == "nf4-dq"
        config = qlora.QLoRAConfig(lora=adapters, double_quant=double_quant, compute_dtype=torch.bfloat16)
        model = qlora.apply(model, config)
    else:
        model = apply_method(model, settings["method"])
    model.train()
    if settings["grad_checkpointing"]:
        memory.enable_checkpointing(model)
    return model


# -- the anchors ----------------------------------------------------------------------------------------------------
def accelerate_rule(total_parameters: int, precision: str) -> int:
    """accelerate's training figure: max(model, gradients, optimizer, step) = 4× the fp32 size in fp32, 2× the
    16-bit size in bf16 (its "float16/bfloat16" row); the same for every method and batch."""
    return 16 * total_parameters if precision == "fp32" else 4 * total_parameters


def gpu_poor_formula(settings: dict) -> int | None:
    """gpu_poor's training estimate (bytes, its 650 MB overhead left out), or None where it has no such option."""
    method = {"full": "full_trn", "lora": "lora_trn", "qlora": "qlora"}.get(settings["method"])
    optimizer = {"adamw": "adam_opt", "sgd-momentum": "sgd_opt", "sgd": "sgd_opt"}.get(settings["optimizer"])
    if method is None or optimizer is None:
        return None
    config = models.architecture_config(settings["architecture"])
    h, inter, layers, heads, vocab = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                                      config.num_attention_heads, config.vocab_size)  # fmt: skip
    batch, length, fb = settings["batch_size"], settings["seq_len"], 2.0
    params = vocab * h * 2 + layers * 4 * h * h + layers * 3 * inter * h
    size = params * fb
    weights = size / 4 - params * 2 / 64 + 0.06 * size if method == "qlora" else size
    attention = length * h * 3 * fb + length * h * 2 * fb + length**2 * heads * (2 * fb + 4) + 3 * length * h * fb
    ffn = 2 * h * length * fb + 5 * length * inter * fb + inter * length * fb
    norm = length * 4 * 2 + length * h * fb * 6
    activations = (attention + ffn + norm) * layers * batch * (0.15 if settings["grad_checkpointing"] else 1.0)
    states = 3 if optimizer == "adam_opt" else 1
    if method == "full_trn":
        grad_and_optimizer = params * states * fb
    elif method == "lora_trn":
        grad_and_optimizer = layers * 8 * h * 2 * 4 * (3 * 2 if optimizer == "adam_opt" else 2)
    else:
        common = (15 * h + 6 * inter) * layers
        extra = 0.75 * common * 50 * max(1.0, (length / 50) ** 0.5)
        grad_and_optimizer = layers * 8 * h * 0.5 * 4 * states + extra * batch
    return int(weights + grad_and_optimizer + activations)


# -- running ----------------------------------------------------------------------------------------------------------
def measure_phases(model: torch.nn.Module, batch: dict, settings: dict, steps: int = 3) -> dict:
    """Peak allocated bytes of the forward pass, the backward pass and the optimizer step, over ``steps`` steps
    (the optimizer states exist from the first step on, so the later steps show the steady state)."""
    optimizer = memory.make_optimizer(model, settings["optimizer"])
    autocast = settings["precision"] == "bf16-mixed"
    peaks = {"forward": 0, "backward": 0, "step": 0}
    for _ in range(steps):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        peaks["forward"] = max(peaks["forward"], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        del loss
        peaks["backward"] = max(peaks["backward"], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peaks["step"] = max(peaks["step"], torch.cuda.max_memory_allocated())
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"peaks": peaks, "reserved": torch.cuda.memory_reserved(),
            "cuda_context": max(0, total - free - torch.cuda.memory_reserved())}  # fmt: skip


def estimate_columns(settings: dict, measured: int) -> dict:
    """The estimate and the anchors for a row, and each one's error against the measured peak."""
    estimate = memory.estimate(settings["architecture"], **{k: v for k, v in settings.items() if k in ESTIMATED})
    columns = {"estimate_bytes": estimate.peak, "estimate_breakdown": estimate.breakdown,
               "estimate_peak_phase": estimate.peak_phase, "saved_bytes_estimate": estimate.saved_bytes,
               "accelerate_bytes": accelerate_rule(estimate.total_parameters, settings["precision"]),
               "gpu_poor_bytes": gpu_poor_formula(settings)}  # fmt: skip
    for name in ("estimate", "accelerate", "gpu_poor"):
        figure = columns[f"{name}_bytes"]
        columns[f"{name}_error"] = None if figure is None else (figure - measured) / measured
    return columns


ESTIMATED = ("method", "batch_size", "seq_len", "precision", "optimizer", "grad_checkpointing", "attn_implementation")


def run_row(settings: dict) -> dict:
    """Build, measure and estimate one row (call it in a fresh process)."""
    model = build(settings)
    ids = torch.randint(0, model.config.vocab_size, (settings["batch_size"], settings["seq_len"]), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    started = time.perf_counter()
    measured = measure_phases(model, batch, settings)
    seconds = time.perf_counter() - started
    saved = memory.saved_tensor_bytes(model, batch, autocast=settings["precision"] == "bf16-mixed")
    peak = max(measured["peaks"].values())
    measurement = {"measured_bytes": peak, "measured_phases": measured["peaks"], "reserved_bytes": measured["reserved"],
                   "cuda_context_bytes": measured["cuda_context"], "saved_bytes_measured": saved,
                   "seconds": round(seconds, 2)}  # fmt: skip
    return {**settings, **measurement, **estimate_columns(settings, peak)}


def summarise(rows: list[dict]) -> dict:
    errors = [abs(r["estimate_error"]) for r in rows]
    better = [abs(r["estimate_error"]) < min(abs(r[f"{a}_error"]) for a in ("accelerate", "gpu_poor")
                                              if r[f"{a}_error"] is not None) for r in rows]  # fmt: skip
    return {"rows": len(rows), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
            "better_than_both_anchors": sum(better)}  # fmt: skip


def report(result: dict) -> None:
    gpu_poor = "n/a" if result["gpu_poor_error"] is None else format(result["gpu_poor_error"], "+.0%")
    print(f"{result['architecture']:>13} {result['method']:>8} b{result['batch_size']:<2} T{result['seq_len']:<5} "
          f"{result['precision']:>10} {result['attn_implementation']:>5} ckpt={int(result['grad_checkpointing'])} "
          f"{result['optimizer']:>12}: measured {result['measured_bytes'] / MiB:7.0f} MiB "
          f"(fwd/bwd/step {'/'.join(f'{v / MiB:.0f}' for v in result['measured_phases'].values())}), estimate "
          f"{result['estimate_error']:+.1%}, accelerate {result['accelerate_error']:+.0%}, gpu_poor {gpu_poor}",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four rows only")
    parser.add_argument("--estimate", action="store_true", help="recompute the estimates of an existing results file")
    parser.add_argument("--workers", type=int, default=2, help="rows measured at once, each in its own process")
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)  # one row, in a child process
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.estimate:
        record = json.loads(args.out.read_text())
        record["rows"] = [{**r, **estimate_columns({k: r[k] for k in ("architecture", *ESTIMATED)},
                                                   r["measured_bytes"])} for r in record["rows"]]  # fmt: skip
        record["summary"] = summarise(record["rows"])
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        note = "the estimate columns were recomputed on a CPU; the measurements are the GPU's"
        record["estimates_recomputed"] = f"{date.today().isoformat()}, peftlab at {commit or 'unknown commit'}: {note}"
        args.out.write_text(json.dumps(record, indent=1))
        print(json.dumps(record["summary"], indent=1))
        return
    if not torch.cuda.is_available():
        sys.exit("This benchmark measures GPU memory: run it on a CUDA machine.")
    if args.row is not None:
        print(json.dumps(run_row(ROWS[args.row])))
        return

    def child(settings: dict) -> dict | None:
        """One row in its own process: peaks are per process, so two children share a GPU without mixing."""
        done = subprocess.run([sys.executable, __file__, "--row", str(ROWS.index(settings))], capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode != 0:
            print(f"row {settings} failed:\n{done.stderr[-2000:]}", flush=True)
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for result in pool.map(child, QUICK if args.quick else ROWS):
            if result is None:
                continue
            rows.append(result)
            report(result)
            record = {"device": env.device_name(torch.device("cuda")), "date": date.today().isoformat(),
                      "versions": env.package_versions(), "summary": summarise(rows), "rows": rows}  # fmt: skip
            args.out.write_text(json.dumps(record, indent=1))  # after every row: a cut-off run keeps what it has
    print(json.dumps(record["summary"], indent=1))


if __name__ == "__main__":
    main()
