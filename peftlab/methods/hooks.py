"""What the training loop needs from a method beyond ``model(**batch).loss`` (see :func:`peftlab.train.train`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: ``loss_fn(model, batch) -> (loss, {name: value})``: the loss to differentiate and what to log beside it.
LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainingHooks:
    """A method's additions to the loop: its loss, a step after each optimizer step, its optimizer, and the state it
    keeps while training (AdaLoRA's rank allocator), which the loop hands back in ``History.method_state``."""

    loss_fn: LossFn | None = None
    after_step: Callable[[nn.Module, int], Any] | None = None
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    state: Any = None
