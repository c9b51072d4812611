"""How much faster does AdapterDrop make MiniLM-L6 with adapters and AdapterFusion? Inference and training step
times on the CPU, with the adapters (and the fusion) of the first n blocks dropped.

    python benchmarks/adapter_drop_speed.py                # the rows below, on the CPU (minutes on 2 shared cores)
    python benchmarks/adapter_drop_speed.py --device cuda --steps 20 --rounds 5  # on a GPU (fp32, as the CPU's)

MiniLM-L6 (the offline encoder, 6 blocks, d = 384) with a 3-class head and three adapters after the FFN
(bottleneck 48, norms frozen, random W_up so that they compute something), as notebook 07 builds them. The rows:
the base model (only its head trains); one adapter with 0 and 5 blocks dropped; AdapterFusion over the three with
0, 1, 3 and 5 blocks dropped; the fusion pruned to two adapters per layer. A batch of 8 sentences of 64 tokens.
Inference is one forward pass without gradients, in eval mode; training is one step of ``timing.training_step``
(forward, backward, AdamW over what trains). Each row is timed by ``timing.timed_steps`` (``--steps`` steps after 1
warm-up one, 3 by default), the rows in alternating blocks (``timing.alternate``, ``--rounds``, 2 by default) so
that drift falls on all; the median of the steps × rounds timings is reported with its quartiles (the middle half
of the timings: rows whose ranges overlap are not told apart). The defaults suit the CPU's minutes; on a GPU a
second of timings is cheap, so ask for more (``--steps 20 --rounds 5``).

Writes ``benchmarks/results/adapter_drop_speed.json``: per device type a list of runs (a run appends its own,
keeping the others: on a GPU this small model's pass is bound by kernel launches and the host, and the base pass
took 2.8 ms in one run and 4.8 ms in the next, so only ratios inside one run compare). Each run holds the device,
date, versions, threads, the machine's load average before and after (a shared CPU's times scatter with it), the
settings, and one row per model with its trainable parameters and both step times (seconds; median and quartiles).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab import env, models, records
from peftlab.methods import adapter, fusion
from peftlab.params import count_parameters
from peftlab.timing import alternate, median, quartiles, timed_steps, training_step

RESULTS = Path(__file__).resolve().parent / "results" / "adapter_drop_speed.json"
NAMES = ("tweets", "headlines", "quality")
BOTTLENECK, BATCH, TOKENS, WARMUP = 48, 8, 64, 1
FUSION_DROPS = (0, 1, 3, 5)


def with_adapters() -> torch.nn.Module:
    """MiniLM with the three adapters (random up-projections: an adapter at W_up = 0 would be skipped work too)."""
    env.seed_everything(0)
    model = models.load_encoder(labels=["bearish", "bullish", "neutral"])[0]
    for name in NAMES:
        config = adapter.AdapterConfig(bottleneck=BOTTLENECK, placement="ffn", train_norms=False)
        adapter.apply(model, config, adapter=name)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter." in name and ".up." in name:
                param.normal_(std=0.02)
    return model


def variants(batch: dict) -> dict[str, torch.nn.Module]:
    adapted = with_adapters()
    base = models.load_encoder(labels=["bearish", "bullish", "neutral"])[0].requires_grad_(False)
    base.classifier.requires_grad_(True)
    rows = {"base model, head trains": base}
    for n in (0, 5):
        single = copy.deepcopy(adapted)  # its active adapter: the last one added
        rows[f"one adapter, drop {n}"] = fusion.drop(single, n) if n else single
    fused = fusion.apply(copy.deepcopy(adapted), fusion.FusionConfig(adapters=NAMES))
    for n in FUSION_DROPS:
        rows[f"fusion of 3, drop {n}"] = fusion.drop(copy.deepcopy(fused), n) if n else fused
    pruned = copy.deepcopy(fused)
    fusion.prune(pruned, fusion.fusion_weights(pruned, [batch]))
    rows["fusion pruned to 2"] = pruned
    return rows


def milliseconds(row: dict, key: str) -> str:
    """A row's first quartile, median and third quartile of one kind of step, in ms."""
    first, third = row[f"{key}_quartiles"]
    return " ".join(f"{1000 * t:6.2f}" for t in (first, row[f"{key}_seconds"], third))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating blocks per row (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.steps * args.rounds < 4:
        sys.exit(f"--steps {args.steps} --rounds {args.rounds}: ask for at least 4 timings per row (quartiles).")
    device, steps, rounds = torch.device(args.device), args.steps, args.rounds
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA GPU here: run it on a GPU machine, or leave --device out.")
    torch.manual_seed(0)
    ids = torch.randint(1000, 30_000, (BATCH, TOKENS))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (BATCH,))}
    models_by_row = {row: model.to(device) for row, model in variants(batch).items()}  # pruned on the CPU batch
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    load_before = os.getloadavg()[0]

    def inference(model):
        def block():
            model.eval()
            with torch.no_grad():
                return timed_steps(lambda _: model(**inputs), device, steps=steps, warmup=WARMUP)

        return block

    def training(model):
        step = training_step(model, batch, autocast=False)

        def block():
            model.train()
            return timed_steps(step, device, steps=steps, warmup=WARMUP)

        return block

    inferred = alternate({row: inference(model) for row, model in models_by_row.items()}, rounds=rounds)
    trained = alternate({row: training(model) for row, model in models_by_row.items()}, rounds=rounds)
    rows = [{"model": row, "trainable": count_parameters(model).trainable,
             "inference_seconds": median(inferred[row]), "inference_quartiles": quartiles(inferred[row]),
             "train_step_seconds": median(trained[row]), "train_step_quartiles": quartiles(trained[row])}
            for row, model in models_by_row.items()]  # fmt: skip
    measured = {"device": env.device_name(device), "date": date.today().isoformat(),
                "versions": env.package_versions(), "threads": torch.get_num_threads(),
                "load_average": {"before": load_before, "after": os.getloadavg()[0],
                                 "note": "1-minute load average of the machine (other jobs included)"},
                "settings": {"model": "MiniLM-L6 (offline encoder), 3-class head", "adapters": list(NAMES),
                             "placement": "ffn", "bottleneck": BOTTLENECK, "batch_size": BATCH, "seq_len": TOKENS,
                             "steps": steps, "warmup": WARMUP, "rounds": rounds,
                             "statistic": "median, with the first and third quartiles"},
                "rows": rows}  # fmt: skip
    records.append_benchmark_run(args.out, device.type, measured)
    for row in rows:
        print(f"{row['model']:>22}: {row['trainable']:>10,} trainable; ms (Q1 median Q3): inference"
              f" {milliseconds(row, 'inference')}, training step {milliseconds(row, 'train_step')}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
