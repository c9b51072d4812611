"""How does the cost of a step grow? Peak memory (measured and estimated) and step time against sequence length and
batch size, for full fine-tuning, LoRA and QLoRA on one model (SmolLM2-135M, random-init).

    python benchmarks/cost_scaling.py              # on a CUDA GPU: measure, then draw the plot
    python benchmarks/cost_scaling.py --plot-only  # redraw the plot from the results file (any machine)
    python benchmarks/cost_scaling.py --quick      # a tiny Llama on any device, to try the script (no peaks)

Points: sequence length 256, 512, 1024, 2048, 4096 at batch 1; batch 1, 2, 4, 8 at 512 tokens. Each method's model
is built once (as ``memory_accuracy.build`` builds a row: full and LoRA in fp32 weights with bf16 autocast, QLoRA on
an NF4 base computing in bf16; LoRA on q and v with r = 8, QLoRA on every linear layer with r = 8) and reused for
every point. At each point: the peak of ``max_memory_allocated`` over 3 AdamW steps
(``memory_accuracy.measure_phases``), ``peftlab.memory.estimate`` for the same settings with its terms, the median
of 10 timed steps (``timing.timed_steps``), and a compute floor: the step's model FLOPs (``method_speed.step_flops``)
over the GPU's measured bf16 matmul throughput.

Writes ``benchmarks/results/cost_scaling.json`` and draws ``benchmarks/results/cost_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_accuracy import build, measure_phases, row
from method_speed import step_flops

from peftlab import env, memory, models
from peftlab.timing import matmul_tflops, median, timed_steps, training_step

RESULTS = Path(__file__).resolve().parent / "results" / "cost_scaling.json"
ARCHITECTURE = "smollm2-135m"
METHODS = {"full": "bf16-mixed", "lora": "bf16-mixed", "qlora": "nf4"}
SEQ_LENS, BATCHES = (256, 512, 1024, 2048, 4096), (1, 2, 4, 8)
POINTS = [(1, t) for t in SEQ_LENS] + [(b, 512) for b in BATCHES if b != 1]
QUICK_POINTS = [(1, 16), (1, 32), (2, 16)]
MiB = 2**20


def point(model, method: str, batch_size: int, seq_len: int, device, ceiling, args) -> dict:
    settings = row(ARCHITECTURE, method, batch_size, seq_len, METHODS[method])
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids}
    measured = measure_phases(model, batch, settings) if device.type == "cuda" else None
    step = training_step(model, batch, autocast=settings["precision"] == "bf16-mixed")
    seconds = median(timed_steps(step, device, args.steps, args.warmup))
    setup = memory.Setup(method=method, batch_size=batch_size, seq_len=seq_len, precision=METHODS[method])
    estimate = memory.estimate(ARCHITECTURE if not args.quick else models.tiny_config("llama"), setup)
    flops = step_flops(model, {"batch_size": batch_size, "seq_len": seq_len}, method)["flops"]
    peak = None if measured is None else max(measured["peaks"].values())
    return {"method": method, "precision": METHODS[method], "batch_size": batch_size, "seq_len": seq_len,
            "measured_bytes": peak, "measured_phases": None if measured is None else measured["peaks"],
            "estimate_bytes": estimate.peak, "estimate_error": None if peak is None else estimate.peak / peak - 1,
            "estimate_breakdown": estimate.breakdown, "estimate_peak_phase": estimate.peak_phase,
            "step_seconds": seconds, "flops": flops, "tflops": flops / seconds / 1e12,
            "compute_floor_seconds": None if not ceiling else flops / (ceiling * 1e12)}  # fmt: skip


def plot(record: dict, path: Path) -> None:
    """Four panels, two per row: peak memory against sequence length and batch, step time likewise."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = {"full": "tab:red", "lora": "tab:blue", "qlora": "tab:green"}
    names = {"full": "full fine-tuning", "lora": "LoRA (q, v; r = 8)", "qlora": "QLoRA (NF4, all linear; r = 8)"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), sharex="col")
    sweeps = [("seq_len", 1, "sequence length (tokens), batch 1"), ("batch_size", 512, "batch size, 512 tokens")]
    for column, (key, fixed, label) in enumerate(sweeps):
        other = "batch_size" if key == "seq_len" else "seq_len"
        for method in METHODS:
            points = sorted((p for p in record["points"] if p["method"] == method and p[other] == fixed),
                            key=lambda p: p[key])  # fmt: skip
            if not points:
                continue
            x = [p[key] for p in points]
            colour = colours[method]
            memory_ax, time_ax = axes[0][column], axes[1][column]
            if all(p["measured_bytes"] for p in points):
                memory_ax.plot(x, [p["measured_bytes"] / 2**30 for p in points], "o-", color=colour)
            memory_ax.plot(x, [p["estimate_bytes"] / 2**30 for p in points], "--", color=colour)
            time_ax.plot(x, [p["step_seconds"] * 1e3 for p in points], "o-", color=colour)
            if all(p["compute_floor_seconds"] for p in points):
                width = 3.5 if method == "lora" else 1.5  # LoRA's floor lies under QLoRA's (about the same FLOPs)
                time_ax.plot(x, [p["compute_floor_seconds"] * 1e3 for p in points], ":", color=colour, lw=width)
        for ax in axes[:, column]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        axes[1][column].set_xlabel(label)
        axes[1][column].set_xticks(SEQ_LENS if key == "seq_len" else BATCHES)
        axes[1][column].set_xticklabels([str(v) for v in (SEQ_LENS if key == "seq_len" else BATCHES)])
    axes[0][0].set_ylabel("peak memory (GiB)")
    axes[1][0].set_ylabel("step time (ms)")
    handles = [Line2D([], [], color=colours[m], lw=2, label=names[m]) for m in METHODS] + [
        Line2D([], [], color="black", marker="o", label="measured"),
        Line2D([], [], color="black", ls="--", label="peftlab.memory.estimate"),
        Line2D([], [], color="black", ls=":", label="compute floor: model FLOPs / measured bf16 matmul"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"SmolLM2-135M (random-init), AdamW, one training step — {record['device']}")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama on any device, to try the script")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the results file")
    parser.add_argument("--methods", type=lambda text: text.split(","), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"Unknown method(s) {unknown}: choose from {', '.join(METHODS)}.")
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    device = env.resolve_device()
    if device.type != "cuda" and not args.quick:
        sys.exit("This benchmark measures GPU memory and time: run it on a CUDA machine (or --plot-only, --quick). "
                 "The results file is left as it was.")  # fmt: skip
    ceiling = matmul_tflops(device)
    record = {"device": env.device_name(device), "date": date.today().isoformat(), "versions": env.package_versions(),
              "architecture": ARCHITECTURE if not args.quick else "tiny-llama", "matmul_ceiling": ceiling,
              "points": []}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        settings = row(ARCHITECTURE, method, 1, 512, METHODS[method])
        model = build(settings, device=device.type, config=models.tiny_config("llama") if args.quick else None)
        for batch_size, seq_len in QUICK_POINTS if args.quick else POINTS:
            try:
                result = point(model, method, batch_size, seq_len, device, ceiling["tflops"], args)
            except torch.OutOfMemoryError as error:
                result = {"method": method, "batch_size": batch_size, "seq_len": seq_len, "failed": str(error)[:300]}
            record["points"].append(result)
            if "failed" not in result:
                measured = "n/a" if result["measured_bytes"] is None else f"{result['measured_bytes'] / MiB:8.0f}"
                error = "" if result["estimate_error"] is None else f" ({result['estimate_error']:+.1%})"
                print(f"{method:>6} b{batch_size} T{seq_len:<5}: peak {measured} MiB, estimate "
                      f"{result['estimate_bytes'] / MiB:8.0f} MiB{error}, step {result['step_seconds'] * 1e3:7.1f} ms, "
                      f"{result['tflops']:.1f} TFLOP/s", flush=True)  # fmt: skip
            args.out.write_text(json.dumps(record, indent=1))  # after every point: a cut-off run keeps what it has
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    plot(record, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
