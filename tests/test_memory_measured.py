"""The estimator against GPU measurements kept in the repository: re-estimated here on the CPU, every row must stay
close to what the GPU measured. A change to peftlab.memory that breaks its accuracy fails here, not on a GPU.

Sources: ``benchmarks/results/memory_accuracy.json`` (peaks over AdamW/SGD steps and the bytes saved for backward,
27 rows, H100; and issue 11's held-out rows, ``first_reading``, H200) and notebook 02's full run,
``notebooks/results/02_full.json`` (bytes saved for backward by nine methods, H100)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from peftlab import memory, models
from peftlab.methods import apply_method, default_config, lora

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import memory_accuracy  # noqa: E402  (the benchmark's own row settings, estimate and results file)
from memory_accuracy import ESTIMATED, RESULTS, estimate_columns, gpu_of  # noqa: E402

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


# -- the held-out rows of issue 11 (first_reading: H200), at the tolerance the corrected estimator meets ------------
#: Measured on an H200 and first estimated without the mechanisms of issue 11; the corrected estimator was fitted to
#: these rows (LoRA dropout, accumulation, padding, GPT-2 under CUDA autocast, the cuBLAS workspaces), so this
#: guards the corrections, it does not show they generalise. BERT's peak falls inside the forward pass and is under
#: by more than the saved bytes explain (a known gap: the package docstring).
HELD_OUT = [row for row in BENCHMARK["first_reading"]["rows"] if "failed" not in row]
HELD_OUT_SETTINGS = [key for key in memory_accuracy.HELD_OUT[0] if key != "estimator_lacks"]
GPU = gpu_of(BENCHMARK["first_reading"]["device"])
PEAK_TOLERANCE = {"bert-base": 0.07}


def held_out_id(row: dict) -> str:
    extra = [f"accum{row['grad_accumulation']}"] if row["grad_accumulation"] > 1 else []
    extra += ["padded"] if row["padding"] else []
    extra += ["dropout"] if (row["method_config"] or {}).get("dropout") else []
    return "-".join([row["architecture"], row["method"], f"b{row['batch_size']}", f"T{row['seq_len']}", *extra])


#: Rows the estimator misses by more than the tolerance, each a strict expected failure until a term explains it.
KNOWN_GAPS = {
    "bert-base-ptuning-v2-b16-T256": "P-tuning v2 on BERT-base: the peak falls in the forward pass, 19.6 % above the "
    "estimate with every mechanism (22.8 % at the first reading, 2026-12-03), while the saved bytes are within 2.2 %: "
    "a forward transient of the prefixed attention that no term covers yet (issue 13)",
}


@pytest.mark.parametrize("row", [
    pytest.param(row, id=held_out_id(row), marks=[pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[held_out_id(row)])]
                 if held_out_id(row) in KNOWN_GAPS else [])
    for row in HELD_OUT
])  # fmt: skip
def test_held_out_rows_with_every_mechanism(row):
    settings = {key: row[key] for key in HELD_OUT_SETTINGS if key in row}
    columns = estimate_columns(settings, row["measured_bytes"], gpu=GPU, mechanisms=True)
    tolerance = PEAK_TOLERANCE.get(row["architecture"], 0.01)
    assert columns["estimate_error"] == pytest.approx(0, abs=tolerance), BENCHMARK["first_reading"]["device"]
    assert columns["saved_bytes_estimate"] / row["saved_bytes_measured"] - 1 == pytest.approx(0, abs=0.005)
    anchors = [abs(columns[f"{name}_error"]) for name in ("accelerate", "gpu_poor") if columns[f"{name}_error"]]
    assert abs(columns["estimate_error"]) < min(anchors)


def test_the_first_reading_is_kept_as_it_was_measured():
    """The corrected block re-estimates the first reading's rows; it never replaces them."""
    first, corrected = BENCHMARK["first_reading"], BENCHMARK["corrected"]
    assert first["peftlab_commit"].startswith("0a320ca") and first["summary"]["max_abs_error"] > 0.19
    assert [r["measured_bytes"] for r in corrected["rows"]] == [r["measured_bytes"] for r in HELD_OUT]
    assert corrected["summary"]["max_abs_error"] < first["summary"]["max_abs_error"]


@pytest.mark.parametrize("row", BENCHMARK["rows"], ids=row_id)
def test_peak_with_the_cublas_workspaces_is_within_2_percent(row):
    """The 27 H100 rows once the two cuBLAS workspaces of an H100 are counted (``Setup.gpu``)."""
    setup = memory.Setup(**{key: row[key] for key in ESTIMATED}, gpu=gpu_of(BENCHMARK["device"]))
    assert memory.estimate(row["architecture"], setup).peak / row["measured_bytes"] - 1 == pytest.approx(0, abs=0.02)
