"""Decoding from scratch (peftlab.generation) against transformers: each processor, then whole generations."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from peftlab import generation, models
from peftlab.generation import GenerationSettings


@pytest.fixture
def scores():
    return torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def input_ids():
    return torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_is_transformers(scores, input_ids, penalty):
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores.clone())
    assert torch.equal(generation.penalise_repetition(scores, input_ids, penalty), expected)


def test_a_penalised_token_becomes_less_likely_whatever_its_sign():
    scores = torch.tensor([[2.0, -2.0, 1.0]])
    penalised = generation.penalise_repetition(scores, torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_is_transformers(scores, input_ids, k):
    assert torch.equal(generation.keep_top_k(scores, k), TopKLogitsWarper(k)(input_ids, scores.clone()))
    assert (generation.keep_top_k(scores, k) > -math.inf).sum(dim=1).tolist() == [min(k, 50)] * 3


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_is_transformers_and_keeps_the_smallest_nucleus(scores, input_ids, p):
    kept = generation.keep_top_p(scores, p)
    assert torch.equal(kept, TopPLogitsWarper(p)(input_ids, scores.clone()))
    probabilities = scores.softmax(dim=-1)
    for row in range(3):
        nucleus = probabilities[row][kept[row] > -math.inf]
        assert nucleus.sum() >= p - 1e-6  # enough mass ...
        assert nucleus.sum() - nucleus.min() < p + 1e-6  # ... and not one token more than needed


def test_temperature_and_min_new_tokens_are_transformers(scores, input_ids):
    assert torch.equal(scores / 0.7, TemperatureLogitsWarper(0.7)(input_ids, scores.clone()))
    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=3)
    ours = generation.next_token_scores(scores, input_ids, 2, settings, [4, 9])
    theirs = MinNewTokensLengthLogitsProcessor(5, 3, [4, 9])(input_ids, scores.clone())  # prompt of 5, 2 new
    assert torch.equal(ours, theirs) and ours[:, [4, 9]].eq(-math.inf).all()
    assert torch.equal(generation.next_token_scores(scores, input_ids, 3, settings, [4, 9]), scores)


SETTINGS = [
    GenerationSettings(max_new_tokens=12),
    GenerationSettings(max_new_tokens=12, repetition_penalty=1.5, min_new_tokens=4),
    GenerationSettings(max_new_tokens=12, do_sample=True),
    GenerationSettings(max_new_tokens=12, do_sample=True, temperature=0.6, top_k=20),
    GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.4, top_p=0.8, repetition_penalty=1.2),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"sample={s.do_sample},T={s.temperature},k={s.top_k},"
                         f"p={s.top_p},rep={s.repetition_penalty}")  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1])
def test_generate_is_transformers_generate_token_for_token(settings, seed):
    model = models.tiny_model("llama", seed=seed)
    prompt = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed))
    eos = 2
    torch.manual_seed(seed)
    ours = generation.generate(model, prompt, settings, eos_token_id=eos)
    torch.manual_seed(seed)
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), eos_token_id=eos, pad_token_id=0,
                            **settings.hf_kwargs())  # fmt: skip
    assert ours.tolist() == theirs.tolist()


BEAMS = [
    GenerationSettings(max_new_tokens=10, num_beams=3),
    GenerationSettings(max_new_tokens=10, num_beams=4, num_return_sequences=3, length_penalty=0.5),
    GenerationSettings(max_new_tokens=10, num_beams=2, length_penalty=2.0, repetition_penalty=1.3, min_new_tokens=3),
    GenerationSettings(max_new_tokens=10, do_sample=True, num_return_sequences=3, top_k=10),
]


@pytest.mark.parametrize("settings", BEAMS, ids=lambda s: f"beams={s.num_beams},n={s.num_return_sequences},"
                         f"lp={s.length_penalty},sample={s.do_sample}")  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beams_and_several_answers_are_transformers_generate(settings, seed):
    """With a frequent end token (id 2 on a random model) so that beams finish at different lengths."""
    model = models.tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight[2] += 0.4 * model.lm_head.weight[3:].std()  # make EOS likely enough to end some beams
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    ours = generation.generate(model, prompt, settings, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(seed)
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), eos_token_id=2, pad_token_id=1,
                            **settings.hf_kwargs())  # fmt: skip
    assert ours.tolist() == theirs.tolist()


def test_beam_search_finds_a_likelier_answer_than_greedy():
    model = models.tiny_model("llama", seed=3)
    prompt = torch.tensor([[5, 6, 7]])

    def log_probability(sequence: torch.Tensor) -> float:
        with torch.no_grad():
            logits = model(input_ids=sequence).logits[0, 2:-1].log_softmax(dim=-1)
        return logits.gather(1, sequence[0, 3:, None]).sum().item()

    greedy = generation.generate(model, prompt, GenerationSettings(max_new_tokens=6), eos_token_id=-1)
    beams = generation.generate(model, prompt, GenerationSettings(max_new_tokens=6, num_beams=5), eos_token_id=-1)
    assert log_probability(beams) >= log_probability(greedy) - 1e-6


def test_sampling_settings_change_what_is_drawn():
    model = models.tiny_model("llama", seed=0)
    prompt = torch.tensor([[5, 6, 7]])
    drawn = {}
    for name, settings in {"greedy": GenerationSettings(max_new_tokens=8),
                           "hot": GenerationSettings(max_new_tokens=8, do_sample=True, temperature=2.0),
                           "top-1": GenerationSettings(max_new_tokens=8, do_sample=True, top_k=1)}.items():  # fmt: skip
        torch.manual_seed(0)
        drawn[name] = generation.generate(model, prompt, settings, eos_token_id=-1).tolist()
    assert drawn["top-1"] == drawn["greedy"] != drawn["hot"]  # top-k with k = 1 is greedy


def test_generation_stops_at_the_end_token_and_refuses_bad_settings():
    model = models.tiny_model("llama", seed=0)
    prompt = torch.tensor([[5, 6, 7]])
    first = generation.generate(model, prompt, GenerationSettings(max_new_tokens=1), eos_token_id=-1)[0, -1].item()
    stopped = generation.generate(model, prompt, GenerationSettings(max_new_tokens=10), eos_token_id=first)
    assert stopped[0, 3:].tolist() == [first]
    for bad, words in [({"temperature": 0}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"min_new_tokens": 50}, "min_new_tokens"),
                       ({"repetition_penalty": 0}, "repetition_penalty"), ({"num_beams": 0}, "num_beams"),
                       ({"num_beams": 2, "do_sample": True}, "not both"),
                       ({"num_beams": 2, "num_return_sequences": 3}, "beams kept"),
                       ({"num_return_sequences": 2}, "one answer")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            GenerationSettings(**bad)
    with pytest.raises(ValueError, match="one prompt"):
        generation.generate(model, torch.tensor([[5], [6]]), GenerationSettings(), eos_token_id=2)
