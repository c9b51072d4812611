"""How much faster does AdapterDrop make MiniLM-L6 with adapters and AdapterFusion? Inference and training step
times on the CPU, with the adapters (and the fusion) of the first n blocks dropped.

    python benchmarks/adapter_drop_speed.py                # the rows below, on the CPU (minutes on 2 shared cores)
    python benchmarks/adapter_drop_speed.py --device cuda  # the same rows on a GPU (fp32, as the CPU's)

MiniLM-L6 (the offline encoder, 6 blocks, d = 384) with a 3-class head and three adapters after the FFN
(bottleneck 48, norms frozen, random W_up so that they compute something), as notebook 07 builds them. The rows:
the base model (only its head trains); one adapter with 0 and 5 blocks dropped; AdapterFusion over the three with
0, 1, 3 and 5 blocks dropped; the fusion pruned to two adapters per layer. A batch of 8 sentences of 64 tokens.
Inference is one forward pass without gradients, in eval mode; training is one step of ``timing.training_step``
(forward, backward, AdamW over what trains). Each row is timed by ``timing.timed_steps`` (3 steps after 1 warm-up
one), the rows in alternating blocks (``timing.alternate``, 2 rounds) so that drift falls on all; the median of
the 6 steps is reported.

Writes ``benchmarks/results/adapter_drop_speed.json`` (the CPU) or ``adapter_drop_speed_cuda.json`` (a GPU): device,
date, versions, threads, the machine's load average before and after (a shared CPU's times scatter with it), the
settings, and one row per model with its trainable parameters and both median step times (seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab import env, models
from peftlab.methods import adapter, fusion
from peftlab.params import count_parameters
from peftlab.timing import alternate, median, timed_steps, training_step

RESULTS = Path(__file__).resolve().parent / "results" / "adapter_drop_speed.json"
NAMES = ("tweets", "headlines", "quality")
BOTTLENECK, BATCH, TOKENS, STEPS, WARMUP, ROUNDS = 48, 8, 64, 3, 1, 2
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA GPU here: run it on a GPU machine, or leave --device out.")
    out = RESULTS if device.type == "cpu" else RESULTS.with_name(f"{RESULTS.stem}_{device.type}.json")
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
                return timed_steps(lambda _: model(**inputs), device, steps=STEPS, warmup=WARMUP)

        return block

    def training(model):
        step = training_step(model, batch, autocast=False)

        def block():
            model.train()
            return timed_steps(step, device, steps=STEPS, warmup=WARMUP)

        return block

    inferred = alternate({row: inference(model) for row, model in models_by_row.items()}, rounds=ROUNDS)
    trained = alternate({row: training(model) for row, model in models_by_row.items()}, rounds=ROUNDS)
    rows = [{"model": row, "trainable": count_parameters(model).trainable,
             "inference_seconds": median(inferred[row]), "train_step_seconds": median(trained[row])}
            for row, model in models_by_row.items()]  # fmt: skip
    record = {"device": env.device_name(device), "date": date.today().isoformat(),
              "versions": env.package_versions(), "threads": torch.get_num_threads(),
              "load_average": {"before": load_before, "after": os.getloadavg()[0],
                               "note": "1-minute load average of the machine (other jobs included)"},
              "settings": {"model": "MiniLM-L6 (offline encoder), 3-class head", "adapters": list(NAMES),
                           "placement": "ffn", "bottleneck": BOTTLENECK, "batch_size": BATCH, "seq_len": TOKENS,
                           "steps": STEPS, "warmup": WARMUP, "rounds": ROUNDS, "statistic": "median"},
              "rows": rows}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    for row in rows:
        print(f"{row['model']:>22}: {row['trainable']:>10,} trainable, inference {1000 * row['inference_seconds']:6.1f}"
              f" ms, training step {1000 * row['train_step_seconds']:6.1f} ms")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
