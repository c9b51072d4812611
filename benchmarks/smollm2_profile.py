"""Where do SmolLM2-135M's LoRA steps go? The lora_speed row (random-init SmolLM2-135M, fp32 weights, bf16 autocast,
LoRA on q and v, r = 8, 8 × 512 tokens) measured 128 ms on an H100: slower than a 1.2 B Llama shape at the same
token count. This profiles that step with ``torch.profiler`` and times variants that each take one suspect away.

    python benchmarks/smollm2_profile.py            # on a CUDA GPU
    python benchmarks/smollm2_profile.py --quick    # a tiny Llama on any device, to try the script

Suspects, each with its variant: thin layers (30 blocks of width 576: many small kernels, launch-bound) → the same
step at batch 2, 8 and 16 (a launch-bound step barely grows with the batch) and the profiler's GPU-busy fraction;
the 49k-vocabulary logits in fp32 → the step without the LM head and loss; the attention kernel for head_dim 64 with
9 heads over 3 KV heads → the kernel names in the profile, and eager attention; peftlab's LoRA layers → peft's LoRA
and full fine-tuning of the same base; autocast's casts → the model in pure bf16.

Writes ``benchmarks/results/smollm2_profile.json`` (variant times, the kernels grouped by kind with their share of
the step, the top kernels) and ``benchmarks/results/smollm2_profile.txt`` (the profiler's table).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_speed import twin_models

from peftlab import env, models
from peftlab.timing import matmul_tflops, median, timed_steps, training_step

RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_profile.json"
TABLE = RESULTS.with_suffix(".txt")
ROW = {"architecture": "smollm2-135m", "targets": ("q_proj", "v_proj"), "r": 8, "batch_size": 8, "seq_len": 512}
QUICK_ROW = {**ROW, "architecture": "tiny-llama", "batch_size": 2, "seq_len": 32}
#: Kernel kinds, by the first pattern that matches the kernel's name.
KINDS = [  # attention first: cuDNN's SDPA kernels carry "sm90_" in their names, as GEMMs do
    ("attention", r"sdpa|flash|fmha|attention|efficient_attention|mem_eff"),
    ("matmul (GEMM)", r"gemm|gemv|nvjet|cutlass|xmma|sm90_|sm80_|cublas|matmul"),
    ("softmax / cross-entropy", r"softmax|nll_loss|cross_entropy|log_softmax"),
    ("optimizer (AdamW)", r"multi_tensor|adam|foreach"),
    ("copies and casts", r"copy|cast|convert|cat_|CatArray|index|gather|scatter|embedding"),
    ("reductions (norms, sums)", r"reduce|norm|sum|mean|welford"),
    ("element-wise", r"elementwise|vectorized|pointwise|silu|mul|add|pow|rsqrt|neg|sigmoid"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def step_of(model, batch, device, loss_fn=None, autocast=True):
    return training_step(model, batch, autocast=autocast, loss_fn=loss_fn)


def no_head_loss(model, batch):
    """The decoder alone: a loss on the last hidden state, so no LM head, no 49k-wide logits, no cross-entropy."""
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
    return hidden.float().pow(2).mean()


def phase_times(model, batch, device, repeats: int = 5) -> dict:
    """Median ms of the forward pass, the backward pass and the optimizer step, each synchronised apart."""
    import time

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    found = defaultdict(list)
    for index in range(repeats + 2):
        marks = []
        for phase in ("forward", "backward", "step"):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            if phase == "forward":
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = model(**batch).loss
            elif phase == "backward":
                loss.backward()
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append((phase, time.perf_counter() - started))
        if index >= 2:
            for phase, seconds in marks:
                found[phase].append(seconds * 1e3)
    return {phase: median(values) for phase, values in found.items()}


def kernel_summary(prof, steps: int, wall_ms: float) -> dict:
    """Kernels grouped by kind, the top kernels, and how busy the GPU was over the profiled steps."""
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Optimizer.", "ProfilerStep"))
    ]  # user ranges on the GPU row, not kernels
    if not kernels:
        return {"note": "no CUDA kernels recorded (CPU run)"}
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, current_start, current_end = 0.0, *intervals[0]
    for start, end in intervals[1:]:
        if start > current_end:
            busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    span = intervals[-1][1] - intervals[0][0]
    total = sum(e.time_range.elapsed_us() for e in kernels)
    by_kind, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_kind[kind_of(e.name)] += e.time_range.elapsed_us()
        by_name[e.name][0] += e.time_range.elapsed_us()
        by_name[e.name][1] += 1
    step_us = wall_ms * 1e3
    kinds = {
        kind: {
            "ms_per_step": us / steps / 1e3,
            "share_of_kernel_time": us / total,
            "share_of_step": us / steps / step_us,
        }
        for kind, us in sorted(by_kind.items(), key=lambda x: -x[1])
    }
    top = [{"kernel": name[:160], "kind": kind_of(name), "ms_per_step": us / steps / 1e3, "calls_per_step": n / steps,
            "share_of_kernel_time": us / total, "share_of_step": us / steps / step_us}
           for name, (us, n) in sorted(by_name.items(), key=lambda x: -x[1][0])[:20]]  # fmt: skip
    return {"kernels_per_step": len(kernels) / steps, "kernel_ms_per_step": total / steps / 1e3,
            "gpu_busy_ms_per_step": busy / steps / 1e3, "profiled_span_ms_per_step": span / steps / 1e3,
            "gpu_busy_fraction_of_span": busy / span, "mean_kernel_us": total / len(kernels),
            "kinds": kinds, "top_kernels": top}  # fmt: skip


def kernel_counts(row: dict, device, args) -> dict:
    """Per side (peftlab LoRA, peft LoRA, full fine-tuning of the same base): kernels per step and GPU-busy ms per
    step (2 profiled steps), and peft against peftlab timed in alternating blocks (3 × ``--steps`` each), so that
    what is peftlab's (the LoRA layers' extra launches) stands apart from what is the model's."""
    from peftlab.timing import alternate

    reference, ours = twin_models(row, device)
    ids = torch.randint(0, ours.config.vocab_size, (row["batch_size"], row["seq_len"]), device=device)
    batch = {"input_ids": ids, "labels": ids}
    steps = {"peftlab LoRA": step_of(ours, batch, device), "peft LoRA": step_of(reference, batch, device)}
    timed = alternate({name: (lambda f=f: timed_steps(f, device, args.steps, args.warmup)) for name, f in
                       steps.items()}, rounds=3)  # fmt: skip
    config = models.tiny_config("llama") if args.quick else models.architecture_config(row["architecture"])
    torch.manual_seed(0)
    with torch.device(device):
        full = AutoModelForCausalLM.from_config(config)
    steps["full fine-tuning"] = step_of(full, batch, device)
    found = {}
    for name, step in steps.items():
        for index in range(3):
            step(index)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for index in range(2):
                step(index)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        summary = kernel_summary(prof, 2, 1.0)
        found[name] = {key: summary.get(key) for key in ("kernels_per_step", "kernel_ms_per_step",
                                                          "gpu_busy_ms_per_step", "mean_kernel_us")}  # fmt: skip
        found[name]["kinds_ms_per_step"] = {k: v["ms_per_step"] for k, v in summary.get("kinds", {}).items()}
        if name in timed:
            found[name]["median_step_ms_alternating"] = median(timed[name]) * 1e3
            found[name]["steps_timed"] = len(timed[name])
        print(name, json.dumps({k: v for k, v in found[name].items() if k != "kinds_ms_per_step"}), flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny row on any device, to try the script")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--counts",
        action="store_true",
        help="only kernels per step per side and peft vs peftlab alternated, into the results file",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = env.resolve_device()
    if device.type != "cuda" and not args.quick:
        sys.exit("The profile is meant for a CUDA GPU; use --quick to try the script on a CPU. "
                 "The results files are left as they were.")  # fmt: skip
    row = QUICK_ROW if args.quick else ROW
    if args.counts:
        record = json.loads(args.out.read_text()) if args.out.exists() else {}
        record["kernel_counts"] = {"device": env.device_name(device), "date": date.today().isoformat(),
                                   "sides": kernel_counts(row, device, args)}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
        return
    reference, ours = twin_models(row, device)
    vocab = ours.config.vocab_size

    def batch_of(size: int) -> dict:
        ids = torch.randint(0, vocab, (size, row["seq_len"]), device=device)
        return {"input_ids": ids, "labels": ids}

    batch = batch_of(row["batch_size"])
    timed = {}

    def time_it(name, step):
        timed[name] = median(timed_steps(step, device, args.steps, args.warmup)) * 1e3
        print(f"{name:>44}: {timed[name]:8.2f} ms", flush=True)

    time_it("peftlab LoRA (the lora_speed row)", step_of(ours, batch, device))
    time_it("peft LoRA", step_of(reference, batch, device))
    for size in (2, 16):
        time_it(f"peftlab LoRA at batch {size}", step_of(ours, batch_of(size), device))
    time_it("peftlab LoRA without LM head and loss", step_of(ours, batch, device, loss_fn=no_head_loss))
    phases = phase_times(ours, batch, device)
    print(f"phases (ms): {phases}", flush=True)

    # the profile of the row itself: a few steps after warm-up
    step = step_of(ours, batch, device)
    for index in range(3):
        step(index)
    profiled_steps = 3
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    import time

    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for index in range(profiled_steps):
            step(index)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profiled_wall_ms = (time.perf_counter() - started) * 1e3 / profiled_steps
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort_key, row_limit=40, max_name_column_width=90)
    except Exception:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    try:
        summary = kernel_summary(prof, profiled_steps, profiled_wall_ms)
    except Exception as error:  # the table and the times still get written
        summary = {"error": f"{type(error).__name__}: {error}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(table)
    del prof

    # variants that change the model: eager attention, full fine-tuning, pure bf16 (each a fresh model)
    config = models.tiny_config("llama") if args.quick else models.architecture_config(row["architecture"])
    torch.manual_seed(0)
    with torch.device(device):
        eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    from peftlab.methods import lora

    eager = lora.apply(eager, lora.LoRAConfig(r=row["r"], alpha=2 * row["r"], target_modules=row["targets"]))
    time_it("peftlab LoRA, eager attention", step_of(eager, batch, device))
    del eager
    with torch.device(device):
        full = AutoModelForCausalLM.from_config(config)
    time_it("full fine-tuning, same base", step_of(full, batch, device))
    del full
    ours.to(torch.bfloat16)
    time_it("peftlab LoRA, pure bf16 (no autocast)", step_of(ours, batch, device, autocast=False))
    ceiling = matmul_tflops(device)

    record = {"device": env.device_name(device), "date": date.today().isoformat(), "versions": env.package_versions(),
              "row": {**row, "targets": list(row["targets"]), "weights": "fp32, bf16 autocast"},
              "step_ms": timed, "phases_ms": phases, "profiled_steps": profiled_steps,
              "profiled_wall_ms_per_step": profiled_wall_ms, "profile": summary, "matmul_ceiling": ceiling,
              "table_file": TABLE.name}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".txt").write_text(table)
    print(table[:6000])
    print(json.dumps({k: v for k, v in summary.items() if k != "top_kernels"}, indent=1))


if __name__ == "__main__":
    main()
