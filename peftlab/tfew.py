"""T-Few's losses for multiple-choice tasks scored by a causal LM, and rank classification.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(arXiv:2205.05638), section 3.2. An example is an input x and C answer choices ŷ^(1..C), of which y is right. With
the log-probabilities of each choice's tokens, log p(ŷ_t | x, ŷ_<t), the three losses are:

* L_LM = −(1/T) Σ_t log p(y_t | x, y_<t): cross-entropy on the right answer's T tokens (eq. 1's first term);
* L_UL = −Σ_n Σ_t log(1 − p(ŷ^(n)_t | x, ŷ^(n)_<t)) / Σ_n T(ŷ^(n)) over the wrong choices n (eq. 2, unlikelihood:
  push the wrong answers' tokens down);
* L_LN = −log( exp β(x, y) / Σ_c exp β(x, ŷ^(c)) ) with β(x, ŷ) = (1/T(ŷ)) Σ_t log p(ŷ_t | x, ŷ_<t) (eq. 3,
  length-normalised: a softmax over the choices of their mean token log-probability, cross-entropy on the right
  one).

T-Few trains on L = L_LM + L_UL + L_LN. Prediction is rank classification: the choice with the highest β (the
length-normalised log-probability), so a long answer is not penalised for having more tokens.

A batch (:func:`multiple_choice_batches`) holds, for n examples of C choices each, ``input_ids``,
``attention_mask`` and ``choice_mask`` of shape [n, C, T] (prompt then choice, right-padded; ``choice_mask`` is 1
on the choice's tokens) and ``answer`` [n] (the right choice's index; not ``labels``, which a model would read as
its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab import train

#: p is clamped below 1 − this in log(1 − p), so a confident wrong token gives a large, finite loss.
UNLIKELIHOOD_EPSILON = 1e-6


def multiple_choice_batches(
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[str],
    answers: Sequence[int],
    batch_size: int,
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` examples: each prompt followed by every choice (the same choices for every
    prompt), tokenised apart and concatenated, so the choice's tokens are the same after every prompt."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers: give one answer per prompt.")
    if len(choices) < 2:
        raise ValueError(f"A multiple-choice task needs at least 2 choices, got {len(choices)}.")
    if not prompts:
        raise ValueError("No prompts: give at least one example.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if bad := [a for a in answers if not 0 <= a < len(choices)]:
        raise ValueError(f"An answer is {bad[0]}, but there are {len(choices)} choices (0...{len(choices) - 1}).")
    choice_ids = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
    if any(not ids for ids in choice_ids):
        raise ValueError("A choice tokenises to nothing: every choice needs at least one token.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt in prompts[start : start + batch_size]:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            rows.append([(prompt_ids + ids, [0] * len(prompt_ids) + [1] * len(ids)) for ids in choice_ids])
        length = max(len(ids) for row in rows for ids, _ in row)
        shape = (len(rows), len(choices), length)
        input_ids = torch.full(shape, pad, dtype=torch.long)
        attention_mask, choice_mask = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        for i, row in enumerate(rows):
            for c, (ids, mask) in enumerate(row):
                input_ids[i, c, : len(ids)] = torch.tensor(ids)
                attention_mask[i, c, : len(ids)] = 1
                choice_mask[i, c, : len(ids)] = torch.tensor(mask)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "choice_mask": choice_mask,
                        "answer": torch.tensor(answers[start : start + batch_size])})  # fmt: skip
    return batches


def choice_token_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(ŷ_t | x, ŷ_<t), mask)``, both [n, C, T − 1]: the log-probability of every next token, and 1 where
    that token belongs to the choice (the prompt and the padding are 0)."""
    n, choices, length = batch["input_ids"].shape
    flat = {key: batch[key].reshape(n * choices, length) for key in ("input_ids", "attention_mask")}
    logits = model(**flat, use_cache=False).logits[:, :-1].float()
    targets = flat["input_ids"][:, 1:]
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    mask = batch["choice_mask"][:, :, 1:].to(token_logps.dtype)
    return token_logps.reshape(n, choices, length - 1) * mask, mask


def length_normalised_scores(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """β(x, ŷ^(c)) = (1/T(ŷ^(c))) Σ_t log p(ŷ_t | x, ŷ_<t), [n, C]: each choice's mean token log-probability."""
    return token_logps.sum(dim=-1) / mask.sum(dim=-1)


@dataclass
class TFewLosses:
    """The three losses of one batch (each a mean over the examples) and the length-normalised scores β [n, C]."""

    lm: torch.Tensor
    unlikelihood: torch.Tensor
    length_normalised: torch.Tensor
    scores: torch.Tensor


def tfew_losses(token_logps: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor) -> TFewLosses:
    """L_LM, L_UL and L_LN (module docstring, eq. 1–3 of Liu et al., 2022) from the choices' token log-probs
    [n, C, T] (0 outside the choice), their mask and the right choice's index [n]."""
    lengths = mask.sum(dim=-1)  # T(ŷ^(c)), [n, C]
    scores = length_normalised_scores(token_logps, mask)
    right = F.one_hot(answer, num_classes=scores.shape[1]).to(scores.dtype)
    lm = -(scores * right).sum(dim=1).mean()
    probs = token_logps.exp().clamp(max=1 - UNLIKELIHOOD_EPSILON)
    unlikely = -(torch.log1p(-probs) * mask).sum(dim=-1)  # −Σ_t log(1 − p), per choice
    wrong = 1 - right
    unlikelihood = ((unlikely * wrong).sum(dim=1) / (lengths * wrong).sum(dim=1)).mean()
    length_normalised = F.cross_entropy(scores, answer)
    return TFewLosses(lm, unlikelihood, length_normalised, scores.detach())


def tfew_loss_fn(unlikelihood: bool = True, length_normalised: bool = True) -> Callable:
    """A ``loss_fn`` for ``train.train``: L_LM, plus L_UL and L_LN when asked (T-Few: both). Logs each term and the
    batch's rank-classification accuracy."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        losses = tfew_losses(*choice_token_logps(model, batch), batch["answer"])
        loss = losses.lm
        if unlikelihood:
            loss = loss + losses.unlikelihood
        if length_normalised:
            loss = loss + losses.length_normalised
        accuracy = (losses.scores.argmax(dim=1) == batch["answer"]).float().mean().item()
        return loss, {"lm": losses.lm.item(), "ul": losses.unlikelihood.item(),
                      "ln": losses.length_normalised.item(), "accuracy": accuracy}  # fmt: skip

    return loss_fn


@torch.no_grad()
def rank_classify(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted, answer)``: for every example the choice with the highest length-normalised log-probability β,
    and the right one. The model runs in eval mode; its mode is restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predicted, answers = [], []
    try:
        for batch in batches:
            batch = train.to_device(batch, device)
            predicted.append(length_normalised_scores(*choice_token_logps(model, batch)).argmax(dim=1).cpu())
            answers.append(batch["answer"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(predicted), torch.cat(answers)


def rank_metrics(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Accuracy (the share of examples whose highest-β choice is the right one, :func:`rank_classify`) and
    macro-F1 over the choices, as :func:`peftlab.train.metrics_of_predictions` computes them."""
    return train.metrics_of_predictions(*rank_classify(model, batches))
