"""The MiniLM comparisons of notebooks 01, 08 and 09 at several seeds: one seed is not a finding.

    python tools/seed_runs.py                       # full profile on a GPU: every run at seeds 0, 1, 2
    python tools/seed_runs.py --quick               # a few steps on the teaching headlines, on any device

Every run is the notebooks' recipe (MiniLM-L6 with a new 3-class head; financial-tweet sentiment, English; 64
tokens, batch 32, 900 AdamW steps with 10 % warm-up and a linear decay; accuracy and macro-F1 on the 2,388
validation tweets at the end), with ``env.seed_everything(seed)`` before the model is built and the loader
shuffled with the same seed: the seed decides the head's initialisation, LoRA's A, dropout and the batch order.
Runs go to worker processes (the small model leaves a GPU mostly idle). Writes
``notebooks/results/minilm_seeds.json``: device, date, versions, the recipe, one row per (run, seed), and per run
the mean and standard error over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "notebooks" / "results" / "minilm_seeds.json"

HEAD = ("pooler", "classifier")
BLOCK_LINEAR = ("query", "key", "value", "output.dense", "intermediate.dense")
#: (notebook, label): how the run is made and its learning rate; the notebooks' own settings.
RUNS = {
    ("01", "linear probe (k=0)"): ("freeze0", 3e-3),
    ("01", "Freeze (k=2)"): ("freeze2", 2e-4),
    ("01", "full fine-tuning"): ("full", 1e-4),
    ("08", "LoRA q,v r=1"): ("qv:1", 1e-3),
    ("08", "LoRA q,v r=4"): ("qv:4", 1e-3),
    ("08", "LoRA q,v r=8"): ("qv:8", 1e-3),
    ("08", "LoRA q,v r=64"): ("qv:64", 1e-3),
    ("08", "LoRA q,v r=8, pooler frozen"): ("qv-classifier:8", 1e-3),
    ("08", "rsLoRA q,v r=8"): ("rs:8", 1e-3),
    ("08", "rsLoRA q,v r=64"): ("rs:64", 1e-3),
    ("09", "LoRA"): ("all", 1e-3),
    ("09", "QLoRA"): ("qlora", 1e-3),
    ("09", "LoRA+ (λ=16)"): ("loraplus", 2e-4),
    ("09", "LoRA+ (λ=16), head at 1e-3"): ("loraplus-head", 2e-4),
    ("09", "LoRA-FA"): ("lorafa", 1e-3),
    ("09", "LoRA-drop (T=0.9)"): ("loradrop", 1e-3),
    ("09", "AdaLoRA (12→8)"): ("adalora", 1e-3),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    dataset: str = "fin_tweets"
    steps: int = 900
    batch_size: int = 32
    max_length: int = 64
    sample_steps: int = 150  # LoRA-drop's sample run (notebook 09)


def _build(kind: str, seed: int, recipe: Recipe, train_features, tokenizer, device):
    """The model of one run, with its method applied, and its optimizer (None: the loop's AdamW)."""
    import torch

    from peftlab import data, env, models, train
    from peftlab.methods import adalora, lora, lora_drop, qlora, selective

    env.seed_everything(seed)
    model = models.load_encoder(labels=["bearish", "bullish", "neutral"])[0]
    block_lora = lora.LoRAConfig(r=8, alpha=16, target_modules=BLOCK_LINEAR, modules_to_save=HEAD)
    name, _, rank = kind.partition(":")
    if name.startswith("freeze"):
        return selective.apply(model, selective.FreezeConfig(trainable_layers=int(name[-1]))), None
    if name == "full":
        return selective.apply(model, selective.FullConfig()), None
    if name in ("qv", "qv-classifier", "rs"):
        heads = ("classifier",) if name == "qv-classifier" else HEAD
        config = lora.LoRAConfig(r=int(rank), alpha=16, target_modules=("query", "value"), modules_to_save=heads,
                                 use_rslora=name == "rs")  # fmt: skip
        return lora.apply(model, config), None
    if name == "all":
        return lora.apply(model, block_lora), None
    if name == "lorafa":
        return lora.apply(model, dataclasses.replace(block_lora, freeze_A=True)), None
    if name == "qlora":
        return qlora.apply(model, qlora.QLoRAConfig(lora=block_lora)), None
    if name in ("loraplus", "loraplus-head"):
        model = lora.apply(model, block_lora)
        optimizer = lora.loraplus_optimizer(model, lr=2e-4, ratio=16)
        if name == "loraplus-head":  # the head's matrices at LoRA's 1e-3 instead of η_A = 2e-4 (issue 10, A8)
            head = {id(p) for n, p in model.named_parameters() if n.startswith(("classifier", "bert.pooler"))}
            groups = [{**g, "params": [p for p in g["params"] if id(p) not in head]} for g in optimizer.param_groups]
            matrices = [p for n, p in model.named_parameters() if id(p) in head and p.ndim >= 2]
            optimizer = torch.optim.AdamW([g for g in groups if g["params"]] + [{"params": matrices, "lr": 1e-3}],
                                          lr=2e-4)  # fmt: skip
        return model, optimizer
    if name == "loradrop":
        sample = lora.apply(model, block_lora)
        loader = data.make_loader(train_features[: len(train_features) // 4], tokenizer, recipe.batch_size,
                                  shuffle=True, seed=seed)  # fmt: skip
        train.train(sample.to(device), loader, train.TrainConfig(max_steps=recipe.sample_steps, learning_rate=1e-3),
                    progress=False)  # fmt: skip
        importance = lora_drop.layer_importance(sample, loader)
        env.seed_everything(seed)
        fresh = models.load_encoder(labels=["bearish", "bullish", "neutral"])[0]
        return lora_drop.apply(fresh, lora_drop.LoRADropConfig(importance, 0.9, lora=block_lora)), None
    if name == "adalora":
        config = adalora.AdaLoRAConfig(total_steps=recipe.steps, init_r=12, target_r=8, t_init=recipe.steps // 10,
                                       t_final=recipe.steps // 5, delta_t=10, alpha=16, target_modules=BLOCK_LINEAR,
                                       modules_to_save=HEAD)  # fmt: skip
        return adalora.apply(model, config), None
    raise ValueError(f"Unknown run kind {kind!r}.")


def run_one(job: tuple) -> dict:
    """One (run, seed): train and evaluate in this process."""
    import torch

    from peftlab import data, env, models, train

    (notebook, label), seed, recipe = job
    torch.set_num_threads(1)
    device = env.resolve_device()
    kind, learning_rate = RUNS[notebook, label]
    tokenizer = models.load_encoder()[1]
    rows = {split: data.load(recipe.dataset, split, languages=("en",)) for split in ("train", "validation")}
    features = {s: data.tokenize_classification(tokenizer, r, max_length=recipe.max_length) for s, r in rows.items()}
    val_loader = data.make_loader(features["validation"], tokenizer, batch_size=128)
    started = time.perf_counter()
    model, optimizer = _build(kind, seed, recipe, features["train"], tokenizer, device)
    loader = data.make_loader(features["train"], tokenizer, recipe.batch_size, shuffle=True, seed=seed)
    config = train.TrainConfig(max_steps=recipe.steps, learning_rate=learning_rate, warmup_steps=recipe.steps // 10)
    history = train.train(model.to(device), loader, config, optimizer=optimizer, progress=False,
                          evaluate=lambda m: train.classification_metrics(m, val_loader))  # fmt: skip
    return {"notebook": notebook, "run": label, "seed": seed, **history.final, "step": recipe.steps,
            "trainable": history.trainable_parameters, "seconds_per_step": history.seconds_per_step,
            "wall_seconds": time.perf_counter() - started}  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """Per run: mean and standard error (s / √n) of accuracy and macro-F1 over the seeds."""
    summary = []
    for notebook, label in RUNS:
        mine = [r for r in rows if (r["notebook"], r["run"]) == (notebook, label)]
        if not mine:
            continue
        entry = {"notebook": notebook, "run": label, "seeds": sorted(r["seed"] for r in mine)}
        for metric in ("accuracy", "macro_f1"):
            values = [r[metric] for r in mine]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_se"] = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
        summary.append(entry)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 steps on the teaching headlines (any device)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="run kinds, e.g. full,qv:8")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    from peftlab import env

    if not torch.cuda.is_available() and not args.quick:
        sys.exit("The full profile of these runs is meant for a GPU; use --quick to try the script on a CPU. "
                 f"{args.out} is left as it was.")  # fmt: skip
    recipe = Recipe("fin_headlines", 20, 16, 64, 5) if args.quick else Recipe()
    runs = [key for key, (kind, _) in RUNS.items() if args.only is None or kind in args.only]
    jobs = [(key, seed, recipe) for seed in args.seeds for key in runs]
    record = {"device": env.device_name(env.resolve_device()), "date": date.today().isoformat(),
              "profile": "smoke" if args.quick else "full", "versions": env.package_versions(),
              "recipe": dataclasses.asdict(recipe), "seeds": args.seeds, "rows": [], "summary": []}  # fmt: skip
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in pool.map(run_one, jobs):
            record["rows"].append(row)
            print(
                f"{row['notebook']} {row['run']:<30} seed {row['seed']}: accuracy {row['accuracy']:.3f}, "
                f"macro-F1 {row['macro_f1']:.3f} ({row['wall_seconds']:.0f} s)",
                flush=True,
            )
            record["summary"] = summarise(record["rows"])
            args.out.write_text(json.dumps(record, indent=1) + "\n")  # after every run: a cut-off run keeps its rows
    for entry in record["summary"]:
        se = f" ± {entry['accuracy_se']:.3f}" if entry["accuracy_se"] is not None else ""
        print(f"{entry['notebook']} {entry['run']:<30} accuracy {entry['accuracy']:.3f}{se} (n={len(entry['seeds'])})")


if __name__ == "__main__":
    main()
