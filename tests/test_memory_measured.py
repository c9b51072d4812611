"""The estimator against GPU measurements kept in the repository: re-estimated here on the CPU, every row must stay
close to what the GPU measured. A change to peftlab.memory that breaks its accuracy fails here, not on a GPU.

Sources: ``benchmarks/results/memory_accuracy.json`` (peaks over AdamW/SGD steps and the bytes saved for backward,
27 rows, H100) and notebook 02's full run, ``notebooks/results/02_full.json`` (bytes saved for backward by nine
methods, H100)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from peftlab import memory, models
from peftlab.methods import apply_method, default_config, lora

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from memory_accuracy import ESTIMATED, RESULTS  # noqa: E402  (the benchmark's own row settings and results file)

BENCHMARK = json.loads(RESULTS.read_text())
NOTEBOOK_02 = json.loads((REPO / "notebooks" / "results" / "02_full.json").read_text())
MiB = 2**20


def row_id(row: dict) -> str:
    return "-".join(str(row[key]) for key in ("architecture", *ESTIMATED))


@pytest.mark.parametrize("row", BENCHMARK["rows"], ids=row_id)
def test_peak_estimate_is_within_5_percent_of_the_measured_peak(row):
    estimate = memory.estimate(row["architecture"], memory.Setup(**{key: row[key] for key in ESTIMATED}))
    assert estimate.peak / row["measured_bytes"] - 1 == pytest.approx(0, abs=0.05), BENCHMARK["device"]


@pytest.mark.parametrize("row", BENCHMARK["rows"], ids=row_id)
def test_saved_for_backward_estimate_is_within_2_percent_of_the_benchmark_measurement(row):
    estimate = memory.estimate(row["architecture"], memory.Setup(**{key: row[key] for key in ESTIMATED}))
    assert estimate.saved_bytes / row["saved_bytes_measured"] - 1 == pytest.approx(0, abs=0.02)


def lora_config(fields: dict | None) -> lora.LoRAConfig | None:
    """A LoRAConfig from its JSON form (tuples come back as lists)."""
    if fields is None:
        return None
    return lora.LoRAConfig(**{key: tuple(v) if isinstance(v, list) else v for key, v in fields.items()})


@pytest.mark.parametrize("row", NOTEBOOK_02["saved_for_backward"]["rows"], ids=lambda row: row["method"])
def test_saved_for_backward_estimate_is_within_2_percent_of_notebook_02_gpu_run(row):
    run = NOTEBOOK_02["saved_for_backward"]
    assert NOTEBOOK_02["profile"] == "full" and run["kernels"] == "cuda", "the record should come from a GPU run"
    base = models.meta_model(NOTEBOOK_02["architecture"])
    model = apply_method(base, row["peftlab_method"], lora_config(row["lora"]))
    estimate = memory.estimate(
        model,
        memory.Setup(
            method=row["peftlab_method"],
            batch_size=run["batch_size"],
            seq_len=run["seq_len"],
            precision=run["precision"],
            device=run["kernels"],
        ),
        applied=True,
    )
    assert estimate.saved_bytes / (row["measured MiB"] * MiB) - 1 == pytest.approx(0, abs=0.02)


#: The default configs that notebook 02's run used where its record says ``"lora": null``. (``None`` for a head
#: means "a classifier's new head": SmolLM2 has none, so it is what the run had, no head trained.) If a default changes,
#: the record no longer describes what a default-config model is: re-run notebook 02's full profile on a GPU (or
#: record the config), then update this table.
DEFAULTS_OF_THE_RUN = {
    "full": {},
    "freeze": {"trainable_layers": 2, "train_head": True},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ("q_proj", "v_proj"), "use_rslora": False,
             "freeze_A": False, "init": "kaiming", "modules_to_save": None, "loraplus_lr_ratio": None},
    "ia3": {"target_modules": None, "feedforward_modules": None, "modules_to_save": None},
    "adapter": {"bottleneck": 64, "placement": ("attention", "ffn"), "non_linearity": "relu", "init_scale": 0.001,
                "train_norms": True, "layers": None, "train_head": None},
    "prompt": {"num_virtual_tokens": 20, "init": "random", "init_text": None, "init_token_ids": None,
               "train_head": None},
    "prefix": {"num_virtual_tokens": 20, "reparametrize": True, "hidden_size": 512, "embedding_dim": None,
               "train_head": None},
}  # fmt: skip


def test_the_defaults_behind_notebook_02s_record_are_unchanged():
    base = models.meta_model(NOTEBOOK_02["architecture"])
    for row in NOTEBOOK_02["saved_for_backward"]["rows"]:
        if row["lora"] is None:
            method = row["peftlab_method"]
            assert dataclasses.asdict(default_config(method, base)) == DEFAULTS_OF_THE_RUN[method], row["method"]
