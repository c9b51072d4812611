"""T-Few's losses (Liu et al., 2022, eq. 1-3) against a hand calculation, and the loss_fn on a tiny model."""

import math

import pytest
import torch

from peftlab import models, tfew, train
from peftlab.methods import ia3


def test_losses_match_a_hand_calculation():
    """One example, two choices: the right one has tokens of p = 0.5, 0.25; the wrong one one token of p = 0.2."""
    token_logps = torch.tensor([[[math.log(0.5), math.log(0.25)], [math.log(0.2), 0.0]]])
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    losses = tfew.tfew_losses(token_logps, mask, torch.tensor([0]))
    beta_right, beta_wrong = (math.log(0.5) + math.log(0.25)) / 2, math.log(0.2)  # β = mean token log-prob
    assert losses.lm.item() == pytest.approx(-beta_right)
    assert losses.unlikelihood.item() == pytest.approx(-math.log(1 - 0.2))  # one wrong token
    softmax_right = math.exp(beta_right) / (math.exp(beta_right) + math.exp(beta_wrong))
    assert losses.length_normalised.item() == pytest.approx(-math.log(softmax_right))
    torch.testing.assert_close(losses.scores, torch.tensor([[beta_right, beta_wrong]]))


def test_unlikelihood_averages_over_all_wrong_tokens_and_stays_finite():
    """Eq. 2 divides by the wrong choices' total tokens (here 1 + 2 = 3); p = 1 gives a large finite loss."""
    token_logps = torch.tensor([[[0.0, 0.0], [math.log(0.5), 0.0], [math.log(0.1), math.log(0.3)]]])
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]])
    losses = tfew.tfew_losses(token_logps, mask, torch.tensor([2]))  # the wrong ones: choice 0 (p = 1) and 1
    expected = -(math.log(tfew.UNLIKELIHOOD_EPSILON) + math.log(0.5)) / 2
    assert losses.unlikelihood.item() == pytest.approx(expected, rel=1e-2)  # 1 - 1e-6 rounds in float32
    losses = tfew.tfew_losses(token_logps, mask, torch.tensor([0]))  # the wrong ones: choice 1 and 2, 3 tokens
    assert losses.unlikelihood.item() == pytest.approx(-(math.log(0.5) + math.log(0.9) + math.log(0.7)) / 3)


class _Tokenizer:
    """Every character is a token (its code point); enough to check the batch layout."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


def test_batches_put_the_choice_after_the_prompt_and_mask_it():
    batches = tfew.multiple_choice_batches(_Tokenizer(), ["ab", "c"], ["x", "yz"], [1, 0], batch_size=2)
    (batch,) = batches
    assert batch["input_ids"].shape == (2, 2, 4)
    assert batch["input_ids"][0, 1].tolist() == [ord("a"), ord("b"), ord("y"), ord("z")]
    assert batch["choice_mask"][0, 1].tolist() == [0, 0, 1, 1]
    assert batch["choice_mask"][1, 0].tolist() == [0, 1, 0, 0]
    assert batch["attention_mask"][1, 0].tolist() == [1, 1, 0, 0]
    assert batch["answer"].tolist() == [1, 0]


def test_bad_inputs_are_refused():
    tokenizer = _Tokenizer()
    with pytest.raises(ValueError, match="one answer per prompt"):
        tfew.multiple_choice_batches(tokenizer, ["a"], ["x", "y"], [0, 1], 1)
    with pytest.raises(ValueError, match="at least 2 choices"):
        tfew.multiple_choice_batches(tokenizer, ["a"], ["x"], [0], 1)
    with pytest.raises(ValueError, match=r"An answer is 2, but there are 2 choices"):
        tfew.multiple_choice_batches(tokenizer, ["a"], ["x", "y"], [2], 1)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        tfew.multiple_choice_batches(tokenizer, ["a"], ["x", ""], [0], 1)


def test_token_logps_are_the_models_and_training_raises_rank_accuracy():
    torch.manual_seed(0)
    model = ia3.apply(models.tiny_model("llama"), ia3.IA3Config())
    generator = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(3, 50, (4,), generator=generator)] for _ in range(8)]

    class Ids:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    choices = [[60, 61], [62]]
    batches = tfew.multiple_choice_batches(Ids(), prompts, choices, [i % 2 for i in range(8)], batch_size=8)
    token_logps, mask = tfew.choice_token_logps(model, batches[0])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0] + [60, 61]])).logits
    by_hand = torch.log_softmax(logits[0, 3], -1)[60] + torch.log_softmax(logits[0, 4], -1)[61]
    torch.testing.assert_close(token_logps[0, 0].sum(), by_hand, atol=1e-5, rtol=1e-5)
    assert mask[0, 0].sum() == 2 and mask[0, 1].sum() == 1
    before = tfew.rank_metrics(model, batches)["accuracy"]
    config = train.TrainConfig(max_steps=30, learning_rate=5e-2, schedule="constant")
    history = train.train(model, batches, config, loss_fn=tfew.tfew_loss_fn(), progress=False)
    assert history.losses[-1] < history.losses[0] - 0.1
    assert tfew.rank_metrics(model, batches)["accuracy"] > before
    assert history.metrics["ln"][-1] < history.metrics["ln"][0]
    assert set(history.metrics) == {"lm", "ul", "ln", "accuracy"}
