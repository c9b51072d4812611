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
   same seed it draws what transformers' ``generate`` draws); ``num_return_sequences`` draws that many at once.

**Beam search** keeps the ``num_beams`` best partial answers by their summed log-probability Σ log p(y_t | y_<t)
instead of one. Each step every beam is extended by every token, and the best 2·``num_beams`` candidates are looked
at: those that end (EOS, or the length limit) among the best ``num_beams`` become *finished* hypotheses, scored
Σ log p / L^λ (L the answer's length, λ = ``length_penalty``: λ > 0 favours longer answers, since log-probabilities
only add up below 0); the best ``num_beams`` that go on are the next beams. Search stops when no running beam,
scored as if it ended now, could beat the worst of ``num_beams`` finished ones (transformers' default,
``early_stopping=False``). The best finished hypotheses are returned.

For clarity :func:`generate` recomputes the whole sequence at every step; ``model.generate`` keeps a KV cache and
gets the same logits up to rounding (the cache is taught with prefix tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy (the default), sampling (``do_sample``: temperature, top-k, top-p) or beam search
    (``num_beams`` > 1, with ``length_penalty``); ``num_return_sequences`` answers from sampling or from the beams.

    ``top_k=0`` and ``top_p=1.0`` switch those filters off; ``repetition_penalty=1.0`` is no penalty.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    num_return_sequences: int = 1

    def __post_init__(self):
        whole = {"max_new_tokens": 1, "top_k": 0, "min_new_tokens": 0, "num_beams": 1, "num_return_sequences": 1}
        for name, least in whole.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be a whole number ≥ {least}, got {value!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} is above max_new_tokens={self.max_new_tokens}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be positive (towards 0 is greedy: use do_sample=False), got {self.temperature!r}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("Beam search here is deterministic: choose num_beams > 1 or do_sample=True, not both")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} is more than the {self.num_beams} beams kept"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError("Greedy decoding gives one answer: sample (do_sample=True) or search beams for more")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive (1 = none), got {self.repetition_penalty!r}")

    def hf_kwargs(self) -> dict:
        """The same settings as keyword arguments of transformers' ``generate`` (every one explicit, so that the
        model's own generation_config, e.g. a default top_k of 50, changes nothing)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                  "repetition_penalty": self.repetition_penalty, "do_sample": self.do_sample,
                  "num_beams": self.num_beams, "num_return_sequences": self.num_return_sequences}  # fmt: skip
        if self.num_beams > 1:
            kwargs.update(length_penalty=self.length_penalty, early_stopping=False)
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


def _last_logits(model, sequences: torch.Tensor) -> torch.Tensor:
    return model(input_ids=sequences, attention_mask=torch.ones_like(sequences), use_cache=False).logits[:, -1]


@torch.no_grad()
def generate(
    model, input_ids: torch.Tensor, settings: GenerationSettings, eos_token_id: int | list[int], pad_token_id: int = 0
) -> torch.Tensor:
    """The prompt ``input_ids`` (one, shape 1 × T) and what is decoded after it: ``num_return_sequences`` rows,
    each up to and including its first end-of-sequence token (then ``pad_token_id``), or ``max_new_tokens`` long."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate decodes one prompt at a time (shape 1 × T); got shape {tuple(input_ids.shape)}")
    eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if settings.num_beams > 1:
        return beam_search(model, input_ids, settings, eos_token_ids, pad_token_id)
    sequences = input_ids.repeat(settings.num_return_sequences, 1)
    running = torch.ones(len(sequences), dtype=torch.bool)
    for new_tokens in range(settings.max_new_tokens):
        scores = next_token_scores(_last_logits(model, sequences), sequences, new_tokens, settings, eos_token_ids)
        if settings.do_sample:
            tokens = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = torch.where(running, tokens, pad_token_id)  # an answer that ended is padded
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        running &= ~torch.isin(tokens, torch.tensor(eos_token_ids))
        if not running.any():
            break
    return sequences


def beam_search(model, input_ids: torch.Tensor, settings: GenerationSettings, eos_token_ids: list[int],
                pad_token_id: int) -> torch.Tensor:  # fmt: skip
    """Beam search as the module docstring describes it, step for step as transformers' ``generate`` does it."""
    prompt_length, beams = input_ids.shape[1], settings.num_beams
    max_length = prompt_length + settings.max_new_tokens
    looked_at = max(2, 1 + len(eos_token_ids)) * beams  # enough candidates that `beams` of them go on
    prompt = input_ids[0].tolist()
    running = [(prompt, 0.0)] + [(prompt, -1e9)] * (beams - 1)  # one real beam at first: the others never win
    finished: list[tuple[float, list[int]]] = []  # (Σ log p / L^λ, tokens), the best `beams` of them
    for new_tokens in range(settings.max_new_tokens):
        sequences = torch.tensor([tokens for tokens, _ in running])
        log_probs = _last_logits(model, sequences).float().log_softmax(dim=-1)
        log_probs = next_token_scores(log_probs, sequences, new_tokens, settings, eos_token_ids)
        totals = log_probs + torch.tensor([score for _, score in running])[:, None]
        vocabulary = totals.shape[-1]
        scores, indices = torch.topk(totals.flatten(), looked_at)
        candidates = [(running[index // vocabulary][0] + [index % vocabulary], score)
                      for index, score in zip(indices.tolist(), scores.tolist(), strict=True)]  # fmt: skip
        length = new_tokens + 1
        ends = [tokens[-1] in eos_token_ids or len(tokens) >= max_length for tokens, _ in candidates]
        finished += [(score / length**settings.length_penalty, tokens)
                     for (tokens, score), end in list(zip(candidates, ends, strict=True))[:beams] if end]  # fmt: skip
        finished = sorted(finished, key=lambda hypothesis: hypothesis[0], reverse=True)[:beams]
        running = [candidate for candidate, end in zip(candidates, ends, strict=True) if not end][:beams]
        if all(ends):
            break
        best_running = running[0][1] / length**settings.length_penalty
        if len(finished) == beams and best_running <= min(score for score, _ in finished):
            break  # no running beam, ending now, would beat the worst finished hypothesis
    answers = [tokens for _, tokens in finished[: settings.num_return_sequences]]
    width = max(map(len, answers))
    return torch.tensor([tokens + [pad_token_id] * (width - len(tokens)) for tokens in answers])
