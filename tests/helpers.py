"""Checks shared by several test modules."""

import pytest
import torch

from peftlab import compat, models
from peftlab.train import TrainConfig, train


def assert_trains_and_leaves_the_base_bit_identical(apply, arch: str, task: str, config) -> None:
    """``apply(base, config)`` on a tiny model: eight steps on one batch lower the loss, and the base's own weights
    do not move (a classification head may, when the config trains it)."""
    base = models.tiny_model(arch, task)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = apply(base, config)
    input_ids = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    labels = input_ids if task == "causal_lm" else torch.tensor([0, 1, 2, 1])
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    history = train(model, [batch], TrainConfig(max_steps=8, learning_rate=3e-2, schedule="constant"), progress=False)
    assert history.losses[-1] < history.losses[0] - 1e-3
    changed = {name for name, tensor in base.state_dict().items() if not torch.equal(tensor, before[name])}
    trains_head = model.peftlab.config.train_head  # as decided at apply (None: a classifier's head trains)
    assert trains_head == (config.train_head if config.train_head is not None else task == "classification")
    assert changed == ({"classifier.weight", "classifier.bias"} if trains_head else set())


def reference_break(known: compat.KnownBreak):
    """Mark a comparison with a reference library that is known to break under the installed releases.

    Under the releases ``known`` names, the test is a *strict* expected failure: it must fail with exactly the
    known error (see :func:`call_reference`), and it turns red the day upstream mends it, so that the comparison
    comes back. Under any other releases it is an ordinary test. Never a skip: the test first checks that
    peftlab's side still works.
    """
    return pytest.mark.xfail(known.holds(), reason=known.describe(), raises=known.error, strict=True)


def call_reference(known: compat.KnownBreak, run):
    """``run()``, the reference library's side of a comparison; where ``known`` holds, its error must carry exactly
    the known message (another error is a new break, and fails the test)."""
    try:
        return run()
    except known.error as error:
        if known.holds():
            assert known.message in str(error), f"{known.name}: a different error than the known one: {error}"
        raise
