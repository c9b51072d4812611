"""How much slower do bottleneck adapters make inference? Median forward time of MiniLM-L6 with and without them.

    python benchmarks/adapter_latency.py                 # on the CPU (the default)
    python benchmarks/adapter_latency.py --device cuda   # the GPU row (fp32, as the CPU's)
    python benchmarks/adapter_latency.py --threads 0     # the CPU with torch's default threads (a quiet machine)

Adapters cannot be merged into the weights (the non-linearity sits between W_down and W_up), so every forward pass
pays for them: per adapter 2·d·m multiply-adds per token and two more kernels. Houlsby et al. (2019) put two per
block; Pfeiffer et al. (2021) one. The rows: the base MiniLM classifier, Houlsby's adapters (m = 64) and Pfeiffer's
(m = 64), unmerged, at batch sizes 1, 8 and 32 of 64 tokens, in eval mode without gradients. After a warm-up
pass each, the three models take turns pass by pass (``timing.alternate`` with blocks of one pass, 60 rounds), so
that the load of a shared machine falls on all three alike. A row gives each model's median time and
``slowdown``, the median over the rounds of the paired ratio adapter / base, minus 1. On the CPU it runs on one
thread by default (``--threads 1``): on a machine shared with other jobs, torch's threads wait on each other and
the times swing by tens of per cent.

Writes ``benchmarks/results/adapter_latency.json``: per device type a list of runs (a run appends its own, keeping
the others, so that repeated runs show the spread), each with the device, the date, the versions, the rows and, on
the CPU, the machine's one-minute load average before and after (a shared machine's other jobs are in it).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab import env, models, records
from peftlab.methods import adapter
from peftlab.timing import forward_latency

RESULTS = Path(__file__).resolve().parent / "results" / "adapter_latency.json"
BOTTLENECK = 64
BATCH_SIZES = (1, 8, 32)
TOKENS = 64
VARIANTS = {"Houlsby": adapter.HOULSBY, "Pfeiffer": adapter.PFEIFFER}


def build(placement: tuple[str, ...] | None, device: torch.device) -> torch.nn.Module:
    """MiniLM-L6 with a three-class head, seeded; with adapters at ``placement`` (``None``: the base)."""
    torch.manual_seed(0)
    model = models.load_encoder(num_labels=3)[0]
    if placement is not None:
        adapter.apply(model, adapter.AdapterConfig(bottleneck=BOTTLENECK, placement=placement))
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA GPU here: run it on a GPU machine, or leave --device out.")
    load_before = os.getloadavg()[0] if device.type == "cpu" else None
    built = {"base": build(None, device), **{name: build(p, device) for name, p in VARIANTS.items()}}
    rows = []
    for batch_size in BATCH_SIZES:
        generator = torch.Generator().manual_seed(batch_size)
        ids = torch.randint(1000, built["base"].config.vocab_size, (batch_size, TOKENS), generator=generator)
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
        row = {"batch_size": batch_size, "tokens": TOKENS, "passes_per_model": args.rounds,
               **forward_latency(built, batch, device, args.rounds)}  # fmt: skip
        rows.append(row)
        print(f"batch {batch_size:>3} × {TOKENS}: base {row['base_ms']:7.2f} ms, "
              + ", ".join(f"{n} {row[f'{n}_ms']:7.2f} ms ({100 * row[f'{n}_slowdown']:+.1f} %)" for n in VARIANTS),
              flush=True)  # fmt: skip
    measured = {"device": env.device_name(device), "date": date.today().isoformat(), "dtype": "fp32",
                "threads": torch.get_num_threads(), "bottleneck": BOTTLENECK,
                "load_average_1min": None if load_before is None else [load_before, os.getloadavg()[0]],
                "versions": env.package_versions(), "rows": rows}  # fmt: skip
    print(f"wrote {records.append_benchmark_run(args.out, device.type, measured)}")


if __name__ == "__main__":
    main()
