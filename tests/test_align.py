"""DPO from scratch (peftlab.align) against trl's DPOTrainer: tokens, batches, log-probabilities, losses, gradients."""

import copy
import math
import warnings

import pytest
import torch

from peftlab import align, data, methods, models
from peftlab.data import DataError
from peftlab.methods import lora
from peftlab.train import TrainConfig, train

PAIRS = 2  # two pairs: four sequences of different lengths (68 to 89 tokens), so the batch is padded


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = models.load_causal_lm()
    return model, tokenizer


@pytest.fixture(scope="module")
def rows():
    return data.load("preferences")[:PAIRS]


@pytest.fixture(scope="module")
def trl_trainer(smollm2, rows, tmp_path_factory):
    """trl's DPOTrainer on a policy nudged away from its reference (a full copy), so that the margins are not 0."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = smollm2
    reference = copy.deepcopy(model)
    policy = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in policy.model.layers[-1].parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    trl_rows = [{"prompt": row["messages"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
                 "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in rows]  # fmt: skip
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), beta=0.1, report_to=[], use_cpu=True,
                     max_length=None, bf16=False, per_device_train_batch_size=PAIRS)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renamed gradient_checkpointing argument
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(trl_rows))  # fmt: skip
    return trainer, policy, reference


@pytest.fixture(scope="module")
def batch(smollm2, rows):
    _, tokenizer = smollm2
    pairs = [align.tokenize_preference(tokenizer, row) for row in rows]
    return align.collate_preferences(pairs, tokenizer.pad_token_id)


def test_pairs_tokenise_and_batch_as_trl_does(smollm2, rows, trl_trainer, batch):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    _, tokenizer = smollm2
    trainer, _, _ = trl_trainer
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    theirs = [{key: trainer.train_dataset[i][key] for key in keys} for i in range(PAIRS)]
    assert [align.tokenize_preference(tokenizer, row) for row in rows] == theirs
    expected = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(theirs)
    assert set(batch) == set(expected)
    for key in batch:
        assert torch.equal(batch[key], expected[key]), key
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(end_of_turn in pair for key in ("chosen_ids", "rejected_ids") for pair in (t[key] for t in theirs))


def test_loss_and_every_gradient_equal_trl(trl_trainer, batch):
    trainer, policy, reference = trl_trainer
    policy.zero_grad()
    theirs = trainer.compute_loss(policy, batch)
    theirs.backward()
    their_grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    policy_logps, tokens = align.sequence_logps(policy, batch)
    with torch.no_grad():
        reference_logps, _ = align.sequence_logps(reference, batch)
    ours = align.preference_loss(policy_logps, reference_logps, beta=0.1)
    assert abs(ours.loss.item() - math.log(2)) > 1e-3, "the nudge should move the loss off log 2"
    assert ours.loss.item() == pytest.approx(theirs.item(), abs=1e-5)
    ours.loss.backward()
    assert their_grads
    errors = {name: ((p.grad - their_grads[name]).norm() / their_grads[name].norm()).item()
              for name, p in policy.named_parameters()}  # fmt: skip
    # the same up to fp32 rounding, grown through 30 layers of backpropagation (trl sums the head's log-probs in
    # chunks): measured a median relative difference of 2e-5 and a maximum of 1.2e-4 (a layer norm's weight)
    assert sorted(errors.values())[len(errors) // 2] < 1e-4 and max(errors.values()) < 5e-4, max(errors, key=errors.get)
    assert tokens.tolist() == batch["completion_mask"][:, 1:].sum(dim=1).tolist()


def test_the_losses_follow_their_formulas():
    policy = torch.tensor([-10.0, -12.0, -20.0, -18.0])  # [chosen; rejected]
    reference = torch.tensor([-11.0, -12.0, -19.0, -19.0])
    tokens = torch.tensor([4.0, 5.0, 2.0, 10.0])
    # chosen log-ratios (1, 0), rejected (-1, 1): margins beta * (2, -1)
    dpo = align.preference_loss(policy, reference, beta=0.5)
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert dpo.loss.item() == pytest.approx(expected, rel=1e-6)
    assert dpo.margins.tolist() == pytest.approx([1.0, -0.5]) and dpo.accuracy == 0.5
    ipo = align.preference_loss(policy, reference, beta=0.5, loss_type="ipo", completion_tokens=tokens)
    expected = ((1 / 4 - -1 / 2 - 1) ** 2 + (0 / 5 - 1 / 10 - 1) ** 2) / 2
    assert ipo.loss.item() == pytest.approx(expected, rel=1e-6)


def test_the_reference_is_the_model_with_its_adapters_off_and_training_raises_the_margin(smollm2, batch):
    model, _ = smollm2
    model = copy.deepcopy(model)
    with torch.no_grad():
        base, _ = align.sequence_logps(model, batch)
    lora.apply(model, lora.LoRAConfig(r=4))
    loss_fn = align.dpo_loss_fn(beta=0.1)
    loss, _ = loss_fn(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is its reference
    with torch.no_grad(), methods.disabled(model):
        reference, _ = align.sequence_logps(model, batch)
    assert torch.allclose(reference, base, atol=1e-5)
    one_pair = {key: value[[0, PAIRS]] for key, value in batch.items()}  # its chosen and its rejected sequence
    history = train(
        model, [one_pair], TrainConfig(max_steps=8, learning_rate=1e-2, warmup_steps=0), loss_fn=loss_fn, progress=False
    )
    assert history.losses[-1] < 0.5 * math.log(2) and history.metrics["margin"][-1] > 0


def test_bad_pairs_and_settings_are_refused(smollm2):
    _, tokenizer = smollm2
    good = {"messages": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Go away."}
    for broken, words in [({**good, "messages": "Hi?"}, "messages"), ({**good, "chosen": " "}, "'chosen'"),
                          ({**good, "rejected": good["chosen"]}, "same text")]:  # fmt: skip
        with pytest.raises(DataError, match=words):
            align.tokenize_preference(tokenizer, broken)
    with pytest.raises(DataError, match="max_prompt_tokens"):
        align.tokenize_preference(tokenizer, good, max_prompt_tokens=3)
    with pytest.raises(DataError, match="empty"):
        align.collate_preferences([], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="loss_type"):
        align.dpo_loss_fn(loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        align.dpo_loss_fn(beta=0)


def test_ppo_clips_the_ratio_on_the_side_the_advantage_pushes():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.8, 0.55, 0.2, 0.8]))  # ratios 1.6, 1.1, 0.4, 1.6
    advantages = torch.tensor([2.0, 2.0, -1.0, -1.0])
    # by hand, eps = 0.2: min(1.6*2, 1.2*2) = 2.4; min(1.1*2, 1.1*2) = 2.2; min(0.4*-1, 0.8*-1) = -0.8;
    # min(1.6*-1, 1.2*-1) = -1.6 (a bad action made likelier is not clipped: the loss keeps pushing it back)
    expected = (2.4 + 2.2 - 0.8 - 1.6) / 4
    assert align.ppo_clipped_objective(new, old, advantages, clip=0.2).item() == pytest.approx(expected, rel=1e-6)
    new.requires_grad_(True)
    align.ppo_clipped_objective(new, old, advantages, clip=0.2).backward()
    assert new.grad[0] == 0 and new.grad[2] == 0 and new.grad[1] > 0 and new.grad[3] < 0  # clipped: no gradient
    with pytest.raises(ValueError, match="clip"):
        align.ppo_clipped_objective(new, old, advantages, clip=1.5)
