"""Decoding from scratch: how a language model's next-token scores become text, one setting at a time.

A causal language model gives, at each step, logits z ∈ R^V over the vocabulary for the next token. Decoding turns
them into a choice, through a fixed chain of transformations (each equal to transformers' own processor, tested):

1. **Repetition penalty** θ (Keskar et al., 2019, CTRL): every token already in the sequence, prompt included,
   has its score made less likely: z_i ← z_i/θ where z_i > 0, z_i·θ where z_i < 0 (θ > 1 penalises).
2. **A minimum length**: the end-of-sequence token gets score −∞ until ``min_new_tokens`` tokens are written.
3. Sampling only, the *warpers*:
   - **temperature** T: z ← z/T, so that p_i ∝ exp(z_i/T): T < 1 sharpens the distribution, T > 1 flattens it,
     T → 0 is greedy;
   - **top-k** (Fan et al., 2018): every token scoring below the k-th best gets −∞;
   - **top-p**, nucleus (Holtzman et al., 2020): the smallest set of best tokens whose probabilities sum to at
     least p is kept; the rest, the unreliable tail, gets −∞.
4. The choice: **greedy** takes argmax z; **sampling** draws from softmax(z) (``torch.multinomial``, so with the
   same seed it draws what transformers' ``generate`` draws).

For clarity :func:`generate` recomputes the whole sequence at every step; ``model.generate`` keeps a KV cache and
gets the same logits up to rounding (the cache is taught with prefix tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy (``do_sample=False``) or sampling with temperature, top-k and top-p.

    ``top_k=0`` and ``top_p=1.0`` switch those filters off; ``repetition_penalty=1.0`` is no penalty.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k", "min_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_new_tokens" else 0):
                raise ValueError(
                    f"{name} must be a whole number ≥ {1 if name == 'max_new_tokens' else 0}, got {value!r}"
                )
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} is above max_new_tokens={self.max_new_tokens}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be positive (towards 0 is greedy: use do_sample=False), got {self.temperature!r}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive (1 = none), got {self.repetition_penalty!r}")

    def hf_kwargs(self) -> dict:
        """The same settings as keyword arguments of transformers' ``generate`` (every one explicit, so that the
        model's own generation_config, e.g. a default top_k of 50, changes nothing)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens, "num_beams": 1,
                  "repetition_penalty": self.repetition_penalty, "do_sample": self.do_sample}  # fmt: skip
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs


def penalise_repetition(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already in ``input_ids``: z/θ where z > 0, z·θ where z < 0."""
    seen = torch.gather(scores, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def forbid_end(scores: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """The end-of-sequence tokens at −∞ (the answer may not end yet)."""
    scores = scores.clone()
    scores[:, eos_token_ids] = -math.inf
    return scores


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Every token scoring below the k-th best at −∞ (ties with it are kept)."""
    k = min(k, scores.shape[-1])
    kth_best = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth_best, -math.inf)


def keep_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """The nucleus: the best tokens whose probabilities first sum to ≥ p; the tail at −∞ (the best always stays)."""
    ascending, order = torch.sort(scores, descending=False)
    tail = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p  # the tail's mass: at most 1 - p
    tail[..., -1] = False
    return scores.masked_fill(tail.scatter(1, order, tail), -math.inf)


def next_token_scores(logits: torch.Tensor, input_ids: torch.Tensor, new_tokens: int, settings: GenerationSettings,
                      eos_token_ids: list[int]) -> torch.Tensor:  # fmt: skip
    """The scores a choice is made from, after every transformation of the module docstring, in its order."""
    scores = logits.float()
    if settings.repetition_penalty != 1.0:
        scores = penalise_repetition(scores, input_ids, settings.repetition_penalty)
    if new_tokens < settings.min_new_tokens:
        scores = forbid_end(scores, eos_token_ids)
    if settings.do_sample:
        if settings.temperature != 1.0:
            scores = scores / settings.temperature
        if settings.top_k:
            scores = keep_top_k(scores, settings.top_k)
        if settings.top_p < 1.0:
            scores = keep_top_p(scores, settings.top_p)
    return scores


@torch.no_grad()
def generate(
    model, input_ids: torch.Tensor, settings: GenerationSettings, eos_token_id: int | list[int]
) -> torch.Tensor:
    """The prompt ``input_ids`` (one sequence, shape 1 × T) and the tokens decoded after it, up to and including the
    first end-of-sequence token, or ``max_new_tokens`` of them."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate decodes one prompt at a time (shape 1 × T); got shape {tuple(input_ids.shape)}")
    eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    sequence = input_ids
    for new_tokens in range(settings.max_new_tokens):
        logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits[:, -1]
        scores = next_token_scores(logits, sequence, new_tokens, settings, eos_token_ids)
        if settings.do_sample:
            token = torch.multinomial(scores.softmax(dim=-1), num_samples=1)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=-1)
        if token.item() in eos_token_ids:
            break
    return sequence
