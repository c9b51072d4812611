"""ZeRO, checked with numbers: the paper's own Figure 1, DeepSpeed's estimators (a recorded run of DeepSpeed's
code, benchmarks/zero_deepspeed.py), and the split of one of peftlab's estimates."""

import json
from pathlib import Path

import pytest

from peftlab import memory, models
from peftlab.params import count_parameters

RECORD = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zero_deepspeed.json"
GB, GiB = 1e9, 2**30


@pytest.mark.parametrize("stage, gigabytes", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_the_papers_figure_1(stage, gigabytes):
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N = 64, K = 12, mixed-precision Adam."""
    states = memory.zero_model_states(7_500_000_000, 64, stage)
    assert round(states["total"] / GB, 1) == gigabytes
    assert states["total"] == states["weights"] + states["gradients"] + states["optimizer_states"]


def test_an_8b_model_at_stage_1_on_8_gpus_is_about_41_gib_in_the_papers_layout():
    """The paper's layout keeps 16-bit weights and gradients whole and splits K = 12 bytes: 4Ψ + 12Ψ/8 = 5.5Ψ."""
    psi = count_parameters(models.meta_model("llama-3-8b")).total
    assert psi == 8_030_261_248
    states = memory.zero_model_states(psi, 8, 1)
    assert states["total"] == 2 * psi + 2 * psi + 12 * psi // 8
    assert 41 < states["total"] / GiB < 42


def test_deepspeeds_layout_matches_every_row_deepspeed_computed():
    record = json.loads(RECORD.read_text())
    assert record["versions"]["deepspeed"] and len(record["rows"]) == len(models.ARCHITECTURES) * 6
    for row in record["rows"]:
        psi, n, largest = row["parameters"], row["num_gpus"], row["largest_layer_parameters"]
        model = models.meta_model(row["architecture"])
        assert (psi, largest) == (count_parameters(model).total, memory.largest_layer_parameters(model))
        assert memory.zero_model_states(psi, n, 2, "deepspeed")["total"] == row["stage2_gpu_bytes"], row
        assert memory.zero_model_states(psi, n, 3, "deepspeed", largest)["total"] == row["stage3_gpu_bytes"], row


def test_deepspeed_keeps_an_fp32_copy_of_the_gradients_beyond_the_papers_count():
    psi, n = 8_000_000_000, 8
    paper = memory.zero_model_states(psi, n, 2)["total"]
    assert memory.zero_model_states(psi, n, 2, "deepspeed")["total"] - paper == 4 * psi // n


def test_the_largest_layer_of_a_llama_is_its_embedding():
    assert memory.largest_layer_parameters(models.meta_model("llama-3-8b")) == 128256 * 4096


@pytest.mark.parametrize(
    "arguments, message",
    [((0, 8, 1), "parameters must be a whole number of at least 1, got 0"),
     ((10, 0, 1), "num_gpus must be a whole number of at least 1, got 0"),
     ((10, 2.5, 1), "num_gpus must be a whole number of at least 1, got 2.5"),
     ((10, 8, 4), "ZeRO stage must be 0, 1, 2 or 3, got 4"),
     ((10, 8, 1, "deepspeed"), "DeepSpeed estimates stages 2 and 3 only; use layout='paper' for stage 1"),
     ((10, 8, 1, "amp"), "Unknown layout 'amp'; use one of paper, deepspeed")],
)  # fmt: skip
def test_bad_arguments_are_refused_saying_what_to_change(arguments, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        memory.zero_model_states(*arguments)


def test_splitting_an_estimate_divides_what_each_stage_partitions_and_nothing_else():
    estimate = memory.estimate("smollm2-135m", memory.Setup(method="full", batch_size=4, seq_len=512))
    added_by_stage = [[], ["optimizer_states", "optimizer_workspace"], ["gradients"], ["weights"]]
    for stage in range(4):
        partitioned = [term for terms in added_by_stage[: stage + 1] for term in terms]
        eight = memory.zero_per_gpu(estimate, 8, stage)
        for term, value in estimate.breakdown.items():
            assert eight[term] == (-(-value // 8) if term in partitioned else value), (stage, term)
        assert eight["peak"] <= estimate.peak
    assert memory.zero_per_gpu(estimate, 1, 3)["peak"] == estimate.peak
    with pytest.raises(ValueError, match="num_gpus must be at least 1"):
        memory.zero_per_gpu(estimate, 0, 1)
