"""The estimator's DPO term (memory.Setup.preference) against hand arithmetic."""

import pytest

from peftlab import memory


def test_a_pair_batch_is_two_sequences_per_pair_and_sharing_adds_no_bytes():
    plain = memory.estimate("smollm2-135m", memory.Setup(method="lora", batch_size=8, seq_len=256))
    doubled = memory.estimate("smollm2-135m", memory.Setup(method="lora", batch_size=16, seq_len=256))
    pairs = memory.Setup(method="lora", batch_size=8, seq_len=256, preference="shared")
    shared = memory.estimate("smollm2-135m", pairs)
    assert shared.breakdown == doubled.breakdown  # 8 pairs = 16 sequences through the policy; the reference is free
    assert shared.breakdown["activations"] > plain.breakdown["activations"]
    assert shared.setup.settings()["preference"] == "shared" and "preference" not in plain.setup.settings()


@pytest.mark.parametrize(("precision", "bytes_per_weight"), [("bf16-mixed", 4), ("fp32", 4), ("bf16", 2)])
def test_a_reference_copy_holds_every_base_weight_once_more(precision, bytes_per_weight):
    setup = dict(method="lora", batch_size=2, seq_len=128, precision=precision)
    shared = memory.estimate("llama-3-8b", memory.Setup(**setup, preference="shared"))
    kept = memory.estimate("llama-3-8b", memory.Setup(**setup, preference="copy"))
    total = shared.total_parameters - shared.trainable_parameters  # the frozen base: every weight of Llama-3-8B
    assert total == 8_030_261_248  # its config: 32 blocks of 218,112,000, embeddings and head 2 × 525,336,576, norm
    assert kept.breakdown["reference_weights"] == bytes_per_weight * total
    for phase in kept.phases:
        assert sum(kept.phases[phase].values()) - sum(shared.phases[phase].values()) == bytes_per_weight * total
    assert kept.peak - shared.peak == bytes_per_weight * total
    assert "reference_weights" in kept.table().index and "reference_weights" not in shared.table().index


def test_full_fine_tuning_cannot_share_and_unknown_choices_are_refused():
    with pytest.raises(ValueError, match="preference='copy'"):
        memory.Setup(method="full", preference="shared")
    full = memory.estimate("smollm2-135m", memory.Setup(method="full", batch_size=1, seq_len=64, preference="copy"))
    assert full.breakdown["reference_weights"] == 4 * full.total_parameters  # tied head counted once
    with pytest.raises(ValueError, match="preference"):
        memory.Setup(method="lora", preference="twin")
