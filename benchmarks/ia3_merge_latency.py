"""Does merging (IA)³ into the weights remove its inference cost? Median forward time of MiniLM-L6 without (IA)³,
with it unmerged, merged, and merged and unloaded.

    python benchmarks/ia3_merge_latency.py                 # on the CPU (the default)
    python benchmarks/ia3_merge_latency.py --device cuda   # the GPU row (fp32, as the CPU's)

Unmerged, (IA)³ multiplies the keys, the values and the FFN's inner activation by its vectors l_k, l_v and l_ff:
one element-wise product per scaled layer and token, a few FLOPs but one more kernel each. Merged
(``ia3.merge``), the vectors are folded into the weights, diag(l) W or W diag(l), and the model is the base
architecture with other weights, so it should cost exactly what the base costs (Liu et al., 2022, section 3.3) —
once the wrappers are gone too (``ia3.merge_and_unload``): a merged layer still makes its wrapper's call per pass.
The rows: the base MiniLM classifier, (IA)³ unmerged, merged, and unloaded (peftlab's default targets for BERT: key,
value and the FFN's output projection, its input scaled; vectors 1 + 0.3·N(0, 1), so the product is not by ones),
at batch sizes 1, 8 and 32 of 64 tokens, in eval mode without gradients. After a warm-up pass each, the four take
turns pass by pass (``timing.alternate``, 60 rounds), so that a shared machine's load falls on all four alike; a
row gives each model's median time and the median over the rounds of the paired ratio model / base, minus 1. On
the CPU it runs on one thread by default (see ``adapter_latency.py`` for why).

Writes ``benchmarks/results/ia3_merge_latency.json``: per device type a list of runs (each run appends its own),
with the device, the date, the versions, the rows and, on the CPU, the one-minute load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from datetime import date
from pathlib import Path

import torch

from peftlab import env, models, records
from peftlab.methods import ia3
from peftlab.timing import forward_latency

RESULTS = Path(__file__).resolve().parent / "results" / "ia3_merge_latency.json"
BATCH_SIZES = (1, 8, 32)
TOKENS = 64
VARIANTS = ("unmerged", "merged", "unloaded")


def build(device: torch.device) -> dict[str, torch.nn.Module]:
    """The base MiniLM-L6 classifier, and (IA)³ on a copy of it (the same head): unmerged, merged, unloaded."""
    torch.manual_seed(0)
    base = models.load_encoder(num_labels=3)[0]
    unmerged = ia3.apply(copy.deepcopy(base), ia3.IA3Config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unmerged.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    merged = ia3.merge(copy.deepcopy(unmerged))
    unloaded = ia3.merge_and_unload(copy.deepcopy(unmerged))
    return {label: model.to(device).eval() for label, model in
            (("base", base), ("unmerged", unmerged), ("merged", merged), ("unloaded", unloaded))}  # fmt: skip


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
    built = build(device)
    rows = []
    for batch_size in BATCH_SIZES:
        generator = torch.Generator().manual_seed(batch_size)
        ids = torch.randint(1000, built["base"].config.vocab_size, (batch_size, TOKENS), generator=generator)
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
        with torch.no_grad():
            unmerged, merged, unloaded = (built[label](**batch).logits for label in VARIANTS)
        difference = max((merged - unmerged).abs().max().item(), (unloaded - unmerged).abs().max().item())
        if difference > 1e-4:
            sys.exit(f"merged or unloaded (IA)³ differs from unmerged by {difference:.1e}: merging is broken.")
        row = {"batch_size": batch_size, "tokens": TOKENS, "passes_per_model": args.rounds,
               "max_abs_logit_difference_to_unmerged": difference,
               **forward_latency(built, batch, device, args.rounds)}  # fmt: skip
        rows.append(row)
        print(f"batch {batch_size:>3} × {TOKENS}: base {row['base_ms']:7.2f} ms, "
              + ", ".join(f"{v} {row[f'{v}_ms']:7.2f} ms ({100 * row[f'{v}_slowdown']:+.1f} %)" for v in VARIANTS),
              flush=True)  # fmt: skip
    measured = {"device": env.device_name(device), "date": date.today().isoformat(), "dtype": "fp32",
                "threads": torch.get_num_threads(),
                "load_average_1min": None if load_before is None else [load_before, os.getloadavg()[0]],
                "versions": env.package_versions(), "rows": rows}  # fmt: skip
    print(f"wrote {records.append_benchmark_run(args.out, device.type, measured)}")


if __name__ == "__main__":
    main()
