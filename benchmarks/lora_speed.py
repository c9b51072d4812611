"""Is peftlab's LoRA as fast as peft's? Step time of one training step, the same model, batch, dtype and adapters.

    python benchmarks/lora_speed.py              # on a CUDA GPU: every row, bf16 autocast
    python benchmarks/lora_speed.py --quick      # two small rows (also runs on a CPU, to try the script)

For each row both models start from the same random-init base and the same LoRA matrices (copied from peft's
into peftlab's), and train with the same AdamW settings. Each side is timed over ``--steps`` steps after
``--warmup`` steps, with the device synchronised around every step; sides alternate in blocks to spread drift.
The goal is ``ratio = peftlab / peft ≤ 1.05``. Writes ``benchmarks/results/lora_speed.json``: device, date,
versions, and rows with their settings, both median step times, ``ratio`` and ``device``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab import env, models
from peftlab.methods import lora
from peftlab.timing import alternate, timed_steps, training_step

RESULTS = Path(__file__).resolve().parent / "results" / "lora_speed.json"
ROWS = [
    {"architecture": "smollm2-135m", "targets": ("q_proj", "v_proj"), "r": 8, "batch_size": 8, "seq_len": 512},
    {"architecture": "smollm2-135m", "targets": "all-linear", "r": 16, "batch_size": 8, "seq_len": 512},
    {"architecture": "llama-3.2-1b", "targets": ("q_proj", "v_proj"), "r": 8, "batch_size": 4, "seq_len": 1024},
    {"architecture": "llama-3.2-1b", "targets": "all-linear", "r": 16, "batch_size": 4, "seq_len": 1024},
]
QUICK = [{"architecture": "smollm2-135m", "targets": ("q_proj", "v_proj"), "r": 8, "batch_size": 2, "seq_len": 64},
         {"architecture": "smollm2-135m", "targets": "all-linear", "r": 8, "batch_size": 2, "seq_len": 64}]  # fmt: skip


def twin_models(row: dict, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A peft LoRA model and a peftlab LoRA model on identical bases with identical adapters."""
    name = row["architecture"]  # "tiny-llama": the 2-block test model, for trying a script on a CPU
    config = models.tiny_config("llama") if name == "tiny-llama" else models.architecture_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config)
    state = base.state_dict()
    with torch.device(device):
        twin = AutoModelForCausalLM.from_config(config)
    twin.load_state_dict(state)
    targets = list(row["targets"]) if isinstance(row["targets"], tuple) else row["targets"]
    reference = peft.get_peft_model(base, peft.LoraConfig(r=row["r"], lora_alpha=2 * row["r"], target_modules=targets))
    ours = lora.apply(twin, lora.LoRAConfig(r=row["r"], alpha=2 * row["r"], target_modules=row["targets"]))
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            theirs = reference.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(theirs.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(torch.randn_like(layer.lora_B["default"].weight) * 0.01)
            theirs.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    return reference, ours


def step_times(model, batch, device, steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` full training steps (forward, backward, AdamW), after ``warmup`` untimed ones."""
    return timed_steps(training_step(model, batch), device, steps, warmup)


def run(row: dict, device: torch.device, steps: int, warmup: int, rounds: int = 3) -> dict:
    reference, ours = twin_models(row, device)
    ids = torch.randint(0, reference.config.vocab_size, (row["batch_size"], row["seq_len"]), device=device)
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, atol=1e-2, rtol=1e-2)
    timed = alternate({"peft": lambda: step_times(reference, batch, device, steps, warmup),
                       "peftlab": lambda: step_times(ours, batch, device, steps, warmup)}, rounds)  # fmt: skip
    peft_seconds, ours_seconds = (statistics.median(timed[side]) for side in ("peft", "peftlab"))
    return {**row, "targets": row["targets"] if isinstance(row["targets"], str) else list(row["targets"]),
            "dtype": "bf16-mixed" if device.type == "cuda" else "fp32", "steps": steps * rounds,
            "peft_seconds": peft_seconds, "peftlab_seconds": ours_seconds, "ratio": ours_seconds / peft_seconds,
            "device": env.device_name(device)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small rows; runs on a CPU too")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = env.resolve_device()
    if device.type != "cuda" and not args.quick:
        sys.exit("The speed comparison is meant for a CUDA GPU; use --quick to try the script on a CPU.")
    rows = []
    for row in QUICK if args.quick else ROWS:
        result = run(row, device, args.steps, args.warmup)
        rows.append(result)
        print(f"{row['architecture']:>13} r={row['r']:<3} {row['targets']!s:>22} b{row['batch_size']} "
              f"T{row['seq_len']}: peft {result['peft_seconds'] * 1e3:8.1f} ms, peftlab "
              f"{result['peftlab_seconds'] * 1e3:8.1f} ms, ratio {result['ratio']:.3f}", flush=True)  # fmt: skip
    record = {"device": env.device_name(device), "date": date.today().isoformat(),
              "versions": env.package_versions(), "goal": "ratio <= 1.05", "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
