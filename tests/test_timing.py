"""The one timer's paired forward latency: what a row holds (timings themselves belong in benchmarks)."""

import torch

from peftlab import models, timing


def test_forward_latency_gives_each_models_median_and_the_others_paired_slowdown_against_the_base():
    base, other = models.tiny_model("bert", task="classification"), models.tiny_model("bert", task="classification")
    ids = torch.randint(0, base.config.vocab_size, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    row = timing.forward_latency({"base": base.eval(), "other": other.eval()}, batch, torch.device("cpu"), rounds=3)
    assert set(row) == {"base_ms", "other_ms", "other_slowdown"}
    assert row["base_ms"] > 0 and row["other_ms"] > 0 and row["other_slowdown"] > -1
    assert all(p.grad is None for p in base.parameters())  # passes without gradients
