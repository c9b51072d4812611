"""Direct Preference Optimization from scratch: preference pairs as tokens, sequence log-probabilities, the loss.

DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model")
starts from RLHF's objective, a reward r(x, y) kept close to a reference policy π_ref by a KL penalty of weight β:

    max_π  E_x E_{y~π(·|x)} [ r(x, y) ] − β KL( π(·|x) ‖ π_ref(·|x) ).

Its optimum is π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x), so any reward can be written through its optimal policy,
r(x, y) = β log π*(y|x)/π_ref(y|x) + β log Z(x). Under the Bradley-Terry model of a preference y_w ≻ y_l,
p(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), the partition function Z(x) cancels, and the policy is fitted to the
pairs directly, with no reward model and no sampling:

    L_DPO = −E log σ( β [ log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x) ] ).

β log π(y|x)/π_ref(y|x) is the *implicit reward* of a completion; its gap between the chosen and the rejected
answer is the *margin*, and the share of pairs with a positive margin the *reward accuracy*. At the start π = π_ref,
every margin is 0 and the loss is log 2 ≈ 0.693. IPO (Azar et al., 2023) replaces the log-sigmoid by a squared
distance to 1/(2β) of the per-token average log-ratio gap, which stays bounded when pairs are separable.

RLHF's own route (Ouyang et al., 2022) trains a reward model on the pairs, then the policy against it with PPO
(Schulman et al., 2017): :func:`ppo_clipped_objective` is its surrogate, whose clipping keeps each update near the
policy that sampled the answers. DPO needs neither the reward model nor the sampling.

Everything here follows trl 1.16's ``DPOTrainer`` (tested equal: tokens, batches, log-probabilities, losses and
gradients): a conversational pair is tokenised through the chat template, the prompt with the generation prompt
and each answer as the assistant's turn, the answers split off where the token ids diverge; a batch holds the
chosen sequences and then the rejected ones; log π(y|x) sums the completion's next-token log-probabilities.
The reference is the base model: with peftlab's adapters it is the same model with its adapters switched off
(``methods.disabled``), so no second copy is kept — as trl does with a new peft adapter. To train further an
adapter that is already trained (an SFT adapter), trl keeps a frozen copy of it named "ref". peftlab's
``lora.merge`` is not the way there: it keeps the merged adapter in its layer (so that ``unmerge`` can restore the
weights), and a merged model refuses a new adapter and ``disabled``. Build the SFT policy as plain weights instead,
a copy of the base with each adapted layer's ``delta_weight()`` added, and apply a fresh adapter to it (notebook 12
shows both); a merge that also removes the adapter is still to be written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import DataError
from .methods import disabled

LOSS_TYPES = ("sigmoid", "ipo")


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def _token_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(encoded["input_ids"])


def tokenize_preference(tokenizer, row: dict, max_prompt_tokens: int | None = None) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one pair ``{"messages", "chosen", "rejected"}``.

    The prompt is the conversation so far through the chat template with the assistant's header
    (``add_generation_prompt``); each answer is the conversation with the answer as the assistant's turn, and
    starts where its token ids leave the prompt's (a template may render the end of a prompt differently when an
    answer follows). The answer's end of turn is part of it: the model learns to stop. ``max_prompt_tokens``
    refuses a pair whose prompt is longer.
    """
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"A preference row needs 'messages', a list of {{'role', 'content'}} turns; got {row!r:.200}")
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"A preference row needs a non-empty {key!r} answer as text; got {row.get(key)!r:.200}")
    if row["chosen"] == row["rejected"]:
        raise DataError(f"The chosen and rejected answers are the same text, so there is no preference: {row!r:.200}")
    prompt_ids = _token_ids(tokenizer, messages, add_generation_prompt=True)
    chosen = _token_ids(tokenizer, [*messages, {"role": "assistant", "content": row["chosen"]}])
    rejected = _token_ids(tokenizer, [*messages, {"role": "assistant", "content": row["rejected"]}])
    prompt_length = min(_common_prefix_length(prompt_ids, chosen), _common_prefix_length(prompt_ids, rejected))
    if max_prompt_tokens is not None and prompt_length > max_prompt_tokens:
        raise DataError(
            f"The prompt is {prompt_length} tokens, over max_prompt_tokens={max_prompt_tokens}: shorten it, drop the "
            "pair, or raise the limit."
        )
    return {"prompt_ids": prompt_ids[:prompt_length], "chosen_ids": chosen[prompt_length:],
            "rejected_ids": rejected[prompt_length:]}  # fmt: skip


def collate_preferences(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences: the B prompts with their chosen answers, then the same prompts with the rejected.

    ``completion_mask`` is 1 on the answers' tokens; padding is on the right (``attention_mask`` 0 there).
    """
    if not pairs:
        raise DataError("No preference pairs to batch: the data set is empty.")
    sides = ("chosen_ids", "rejected_ids")
    sequences = [pair["prompt_ids"] + pair[side] for side in sides for pair in pairs]
    answers = [(len(pair["prompt_ids"]), len(pair[side])) for side in sides for pair in pairs]
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (sequence, (start, length)) in enumerate(zip(sequences, answers, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        completion_mask[row, start : start + length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π(y|x) per sequence, completion tokens per sequence)``: Σ_t log p(y_t | x, y_<t) over the answer."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].to(logits.dtype)
    logits = logits[:, -targets.shape[1] - 1 : -1]  # a soft prompt's virtual tokens come first: skip them
    token_logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


@dataclass
class PreferenceLoss:
    """The loss of a batch and what it is made of (rewards are β log π/π_ref, detached)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> float:
        """The share of pairs whose chosen answer has the larger implicit reward."""
        return (self.margins > 0).float().mean().item()


def preference_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    completion_tokens: torch.Tensor | None = None,
) -> PreferenceLoss:
    """DPO's (``"sigmoid"``) or IPO's (``"ipo"``) loss from the 2B sequence log-probabilities [chosen; rejected].

    sigmoid: −log σ(β (Δ_w − Δ_l)), Δ = log π(y|x) − log π_ref(y|x);
    ipo:     (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))², the log-ratios averaged over each answer's tokens (as trl does,
             with the IPO authors' agreement), so that β means the same at every answer length.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be positive: it is the weight of the KL penalty")
    log_ratios = policy_logps - reference_logps
    chosen, rejected = log_ratios.chunk(2)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    else:
        if completion_tokens is None:
            raise ValueError("IPO averages over each answer's tokens: pass completion_tokens")
        chosen_tokens, rejected_tokens = completion_tokens.clamp(min=1).chunk(2)
        losses = (chosen / chosen_tokens - rejected / rejected_tokens - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses.mean(), beta * chosen.detach(), beta * rejected.detach())


def dpo_loss_fn(beta: float = 0.1, loss_type: str = "sigmoid"):
    """A ``loss_fn`` for ``train.train``: DPO on a model with adapters, the reference = the same model without them.

    Logs the reward accuracy and the mean margin beside the loss.
    """
    preference_loss(torch.zeros(2), torch.zeros(2), beta, loss_type, torch.ones(2))  # refuse bad settings now

    def loss_fn(model, batch):
        policy, tokens = sequence_logps(model, batch)
        with torch.no_grad(), disabled(model):
            reference, _ = sequence_logps(model, batch)
        result = preference_loss(policy, reference, beta, loss_type, tokens)
        return result.loss, {"reward_accuracy": result.accuracy, "margin": result.margins.mean().item()}

    return loss_fn


def ppo_clipped_objective(new_logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                          clip: float = 0.2) -> torch.Tensor:  # fmt: skip
    """PPO's clipped surrogate, to be maximised: E[min(ρ A, clip(ρ, 1 − ε, 1 + ε) A)], ρ = π_new(a|s) / π_old(a|s).

    Where the advantage A is positive the gain stops growing once ρ > 1 + ε; where it is negative, once ρ < 1 − ε:
    the update has nothing to win by moving the policy further than ε from the one that sampled the actions.
    """
    if not 0 < clip < 1:
        raise ValueError(f"clip={clip} must be in (0, 1): it bounds the ratio to [1 - clip, 1 + clip]")
    ratio = torch.exp(new_logps - old_logps)
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()
