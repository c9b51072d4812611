"""The estimator's mechanisms of issue 11, each checked on the CPU against the bytes autograd really saves
(``memory.saved_tensor_bytes``): LoRA dropout, padded batches, GPT-2's dropouts and KV cache, eager attention
dropout, the loss options, which layers a quantised base quantises (and its head), gradient accumulation and the
cuBLAS workspaces; and the clear errors of the new ``Setup`` fields. (Against the GPU's own measurements:
``tests/test_memory_measured.py``.)"""

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config, LlamaConfig

from peftlab import memory
from peftlab.methods import apply_method, lora, qlora

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from memory_accuracy import SHAPES  # noqa: E402  (the held-out shapes, built from their published configs)

B, T, V = 2, 32, 1000


def llama(attn: str = "sdpa", precision: str = "fp32", tied: bool = True, attention: float = 0.0) -> nn.Module:
    """Two blocks, hidden 64, 4 heads over 2 key-value heads (grouped-query attention), vocabulary 1,000."""
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=V, max_position_embeddings=256,
                         tie_word_embeddings=tied, attention_dropout=attention)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(torch.bfloat16) if precision == "bf16" else model


def gpt2(attn: str = "sdpa", precision: str = "fp32", resid: float = 0.0, embd: float = 0.0, attention: float = 0.0):
    """GPT-2's own dropouts, set apart (the real config has 0.1 for all three)."""
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=V, resid_pdrop=resid,
                        embd_pdrop=embd, attn_pdrop=attention, bos_token_id=1, eos_token_id=1)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(torch.bfloat16) if precision == "bf16" else model


def bert(attn: str = "sdpa", precision: str = "fp32", hidden: float = 0.0, attention: float = 0.0):
    config = BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=V, hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention,
                        num_labels=3)  # fmt: skip
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)
    return model.to(torch.bfloat16) if precision == "bf16" else model


def batch_for(arch: str, padded: bool = False) -> dict:
    ids = torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids if arch != "bert" else torch.tensor([0, 2])}
    if padded:  # the second row right-padded after 20 of its 32 tokens
        mask = torch.ones_like(ids)
        mask[1, 20:] = 0
        batch["attention_mask"] = mask
        if arch != "bert":
            batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def estimated(model, method, precision, attn="sdpa", **options) -> memory.MemoryEstimate:
    setup = memory.Setup(method=method, batch_size=B, seq_len=T, precision=precision, attn_implementation=attn,
                         device="cpu", **options)  # fmt: skip
    return memory.estimate(model, setup, applied=True)


def saved(model, batch, precision) -> int:
    return memory.saved_tensor_bytes(model, batch, autocast=precision == "bf16-mixed")


PRECISIONS = ("fp32", "bf16", "bf16-mixed")


# -- 1. LoRA dropout ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "attn", "freeze_a"), list(itertools.product(PRECISIONS, ("sdpa", "eager"),
                                                                                  (False, True))))  # fmt: skip
def test_lora_dropout_adds_what_autograd_saves(precision, attn, freeze_a):
    """LoRA on every linear layer with dropout 0.1 against the same model without: the estimated increment (a mask
    of every adapted input that needs a gradient, the dropped copies A reads) is the measured one to the byte, and
    the totals are within 1 % (the dropout is read from the model's LoRA layers, not from a setting)."""
    totals = {}
    for dropout in (0.0, 0.1):
        torch.manual_seed(0)
        config = lora.LoRAConfig(r=8, target_modules="all-linear", dropout=dropout, freeze_A=freeze_a)
        model = lora.apply(llama(attn, precision), config).train()
        totals[dropout] = (saved(model, batch_for("llama"), precision),
                           estimated(model, "lora", precision, attn).saved_bytes)  # fmt: skip
    (plain_measured, plain_estimated), (measured, estimate) = totals[0.0], totals[0.1]
    assert estimate - plain_estimated == measured - plain_measured > 0
    assert estimate == pytest.approx(measured, rel=0.01)


def test_lora_dropout_on_the_recorded_h200_row():
    """TinyLlama-1.1B, LoRA r=16 on every linear layer, 4 × 512, bf16-mixed: dropout 0.05 saved 979,369,984 bytes
    more than dropout 0 on the H200 (first reading). Per token and layer: one-byte masks of the q, k, v, gate, up
    (2048 each) and down (5632) inputs, and for o a mask and a bf16 dropped copy of the attention output (3 × 2048),
    less the first block's q, k, v masks (its input needs no gradient): 22 · 2048 · 22016 − 2048 · 6144."""
    shape = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                        num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    setups = [memory.Setup(method="lora", batch_size=4, seq_len=512, method_config=lora.LoRAConfig(
        r=16, alpha=32, target_modules="all-linear", dropout=dropout)) for dropout in (0.0, 0.05)]  # fmt: skip
    plain, dropped = (memory.estimate(shape, setup).saved_bytes for setup in setups)
    assert dropped - plain == 979_369_984 == 22 * 2048 * 22016 - 2048 * 6144


# -- 5. padded batches ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "method", "precision", "attn"),
                         list(itertools.product(("llama", "gpt2", "bert"), ("full", "lora"), ("fp32", "bf16"),
                                                ("sdpa", "eager")))
                         + [(arch, m, "bf16-mixed", "sdpa") for arch in ("llama", "gpt2", "bert")
                            for m in ("full", "lora")])  # fmt: skip
def test_padding_changes_what_the_attention_kernel_saves(arch, method, precision, attn):
    """A padded batch against the same batch unpadded: SDPA gets an explicit mask, keeps it (B·T·T in the compute
    dtype, every layer) and, for grouped-query attention, gets k and v repeated to every head; eager attention
    saves the same either way. The increment is the measured one to the byte."""
    torch.manual_seed(0)
    model = apply_method({"llama": llama, "gpt2": gpt2, "bert": bert}[arch](attn, precision), method).train()
    measured = [saved(model, batch_for(arch, padded), precision) for padded in (False, True)]
    estimate = [estimated(model, method, precision, attn, padding=share).saved_bytes for share in (0.0, 0.2)]
    assert estimate[1] - estimate[0] == measured[1] - measured[0]
    assert (measured[1] > measured[0]) == (attn == "sdpa")
    assert estimate[1] == pytest.approx(measured[1], rel=0.03)


def test_padding_on_the_recorded_h200_rows():
    """The padded rows of the H200 reading saved exactly 256 MiB (Llama-3.2-1B, LoRA, 2 × 1024) and 384 MiB
    (Qwen2.5-0.5B, LoRA, 8 × 512) more than unpadded: k and v repeated from 8 to 32 (2 to 14) heads and a
    B·T·T bf16 mask in each of 16 (24) layers."""
    for shape, batch, seq, mib in (("llama-3.2-1b", 2, 1024, 256), (SHAPES["qwen2.5-0.5b"](), 8, 512, 384)):
        plain, padded = (
            memory.estimate(
                shape, memory.Setup(method="lora", batch_size=batch, seq_len=seq, padding=share)
            ).saved_bytes
            for share in (0.0, 0.2)
        )
        assert padded - plain == mib * 2**20


# -- 6. GPT-2: dropouts, the fused q, k, v and the KV cache's copies --------------------------------------------------
@pytest.mark.parametrize(("method", "precision", "attn"),
                         list(itertools.product(("full", "lora", "prompt", "ia3", "adapter", "bitfit", "freeze"),
                                                PRECISIONS, ("sdpa", "eager"))))  # fmt: skip
def test_gpt2_with_its_dropouts_is_within_half_a_percent(method, precision, attn):
    """GPT-2 with residual and embedding dropout 0.1 (and attention dropout 0.1 in eager attention: SDPA on a CPU
    with dropout leaves its fused kernel). SDPA keeps the whole fused c_attn output (q is a view of it) and the KV
    cache's copies of k and v; eager attention's matmul copies q; the dropouts keep masks."""
    torch.manual_seed(0)
    model = apply_method(gpt2(attn, precision, 0.1, 0.1, 0.1 if attn == "eager" else 0.0), method).train()
    measured = saved(model, batch_for("gpt2"), precision)
    assert estimated(model, method, precision, attn).saved_bytes == pytest.approx(measured, rel=0.005)


def test_gpt2_under_cuda_autocast_closes_the_recorded_rows():
    """What only CUDA shows (``pow`` on autocast's fp32 list: GELU's intermediates in fp32), checked against the
    H200's saved bytes of GPT-2 full and LoRA, 8 × 512, bf16-mixed, real dropouts of 0.1: within 0.01 %, where the
    first reading's estimate was 24 % and 28 % under."""
    record = json.loads((REPO / "benchmarks" / "results" / "memory_accuracy.json").read_text())
    rows = [r for r in record["first_reading"]["rows"] if r["architecture"] == "gpt2"]
    assert len(rows) == 2
    for row in rows:
        setup = memory.Setup(method=row["method"], batch_size=row["batch_size"], seq_len=row["seq_len"])
        estimate = memory.estimate("gpt2", setup).saved_bytes
        assert estimate == pytest.approx(row["saved_bytes_measured"], rel=1e-4)
        assert row["saved_bytes_estimate"] < 0.8 * row["saved_bytes_measured"]  # the first reading's miss


@pytest.mark.parametrize(("method", "precision"), list(itertools.product(("full", "lora", "ia3", "adapter", "bitfit"),
                                                                         PRECISIONS)))  # fmt: skip
def test_bert_with_hidden_dropout_and_its_embedding_mask(method, precision):
    """BERT with hidden dropout 0.1: a mask after each dense layer and, where the embeddings train, one after the
    embedding LayerNorm."""
    torch.manual_seed(0)
    model = apply_method(bert("sdpa", precision, hidden=0.1), method).train()
    measured = saved(model, batch_for("bert"), precision)
    assert estimated(model, method, precision).saved_bytes == pytest.approx(measured, rel=0.025)


@pytest.mark.parametrize(("arch", "precision"), list(itertools.product(("llama", "gpt2", "bert"), ("fp32", "bf16"))))
def test_eager_attention_dropout_keeps_a_mask_and_the_dropped_copy(arch, precision):
    """Attention dropout 0.1 in eager attention: a mask of every probability, and the dropped copy that the
    product with V saves (in place of the probabilities, where they were not cast first). The increment is exact."""
    make = {"llama": llama, "gpt2": gpt2, "bert": bert}[arch]
    totals = []
    for dropout in (0.0, 0.1):
        torch.manual_seed(0)
        model = apply_method(make("eager", precision, attention=dropout), "lora").train()
        totals.append(
            (saved(model, batch_for(arch), precision), estimated(model, "lora", precision, "eager").saved_bytes)
        )
    assert totals[1][1] - totals[0][1] == totals[1][0] - totals[0][0] > 0


# -- 4. the loss --------------------------------------------------------------------------------------------------
class OwnLoss(nn.Module):
    """A causal LM with its loss computed here (labels shifted as transformers shifts them): ``bf16``, cross-entropy
    on the logits as they are; ``chunked``, the head and the loss per chunk of tokens, each in a (reentrant)
    activation checkpoint, so that only the final hidden state is saved."""

    def __init__(self, model: nn.Module, loss: str, chunk: int = 16):
        super().__init__()
        self.model, self.loss, self.chunk = model, loss, chunk

    def forward(self, input_ids, labels):
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
        if self.loss == "bf16":
            logits = self.model(input_ids=input_ids).logits
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), shifted)
        hidden = self.model.model(input_ids=input_ids).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])

        def chunk_loss(h, y):
            return F.cross_entropy(self.model.lm_head(h).float(), y, reduction="sum")

        total = sum(checkpoint(chunk_loss, hidden[i : i + self.chunk], shifted[i : i + self.chunk],
                               use_reentrant=True) for i in range(0, hidden.shape[0], self.chunk))  # fmt: skip
        return total / (shifted != -100).sum()


@pytest.mark.parametrize(("loss", "precision", "method"),
                         [("bf16", "bf16", m) for m in ("lora", "full")]
                         + [("chunked", p, m) for p in PRECISIONS for m in ("lora", "full")])  # fmt: skip
def test_a_loss_that_never_holds_fp32_logits(loss, precision, method):
    """The loss options against a loss computed that way: bf16 cross-entropy saves a bf16 log-softmax (not fp32);
    the chunked loss saves the final hidden state and no logits at all."""
    torch.manual_seed(0)
    model = apply_method(llama("sdpa", precision), method).train()
    measured = saved(OwnLoss(model, loss), batch_for("llama"), precision)
    options = {"loss": loss, **({"loss_chunk_tokens": 16} if loss == "chunked" else {})}
    estimate = estimated(model, method, precision, **options)
    default = estimated(model, method, precision)
    assert estimate.saved_bytes == pytest.approx(measured, rel=0.03)
    assert estimate.saved_bytes < default.saved_bytes
    assert estimate.breakdown["logits_and_loss"] < default.breakdown["logits_and_loss"]


def test_transformers_loss_is_the_default():
    assert memory.Setup().loss == "transformers"
    model = apply_method(llama(), "lora").train()
    assert saved(model, batch_for("llama"), "fp32") == pytest.approx(estimated(model, "lora", "fp32").saved_bytes,
                                                                     rel=0.02)  # fmt: skip


def test_chunked_loss_transient_shrinks_with_the_chunk():
    big, small = (memory.estimate("llama-3.2-1b", memory.Setup(method="lora", batch_size=4, seq_len=1024,
                                                               loss="chunked", loss_chunk_tokens=n))
                  for n in (1024, 256))  # fmt: skip
    plain = memory.estimate("llama-3.2-1b", memory.Setup(method="lora", batch_size=4, seq_len=1024))
    assert small.peak < big.peak < plain.peak


# -- 3. which layers a quantised base quantises, and its head ---------------------------------------------------------
def _real_qlora(targets, tied: bool, head: bool):
    torch.manual_seed(0)
    model = llama(tied=tied)
    config = qlora.QLoRAConfig(lora=lora.LoRAConfig(r=8, target_modules=targets), double_quant=False)
    model = qlora.apply(model, config)
    if head:
        model.lm_head = qlora.Linear4bit.from_linear(model.lm_head, 64, False)
    return model


@pytest.mark.parametrize(
    ("targets", "layers", "head"),
    [
        ("all-linear", "blocks", False),
        ("all-linear", "blocks", True),
        (("q_proj", "v_proj"), "targets", False),
        (("q_proj", "v_proj"), "targets", True),
    ],
)
def test_quantised_layers_and_head_match_the_real_4bit_model(targets, layers, head):
    """The weights of peftlab's real QLoRA model (NF4 codes and block constants of the quantised layers; bf16 for
    every other parameter), estimated from the unquantised architecture with ``quantised_layers`` and
    ``quantise_head``; and the real model itself, estimated as it is (its 4-bit layers are buffers, counted)."""
    real = _real_qlora(targets, tied=False, head=head)
    quantised = sum(m.weight.nbytes for m in real.modules() if isinstance(m, qlora.Linear4bit))
    expected = quantised + 2 * sum(p.numel() for p in real.parameters())
    config = qlora.QLoRAConfig(lora=lora.LoRAConfig(r=8, target_modules=targets), double_quant=False)
    setup = memory.Setup(method="qlora", method_config=config, precision="nf4", quantised_layers=layers,
                         quantise_head=head)  # fmt: skip
    from_architecture = memory.estimate(llama(tied=False).config, setup)
    assert from_architecture.breakdown["weights"] == pytest.approx(expected, abs=64)
    as_it_is = memory.estimate(real, setup, applied=True)
    assert as_it_is.breakdown["weights"] == pytest.approx(expected, abs=64)
    if not head:
        other = memory.Setup(method="qlora", method_config=config, precision="nf4", quantise_head=True)
        assert memory.estimate(llama(tied=False).config, other).breakdown["weights"] < expected


def test_blocks_quantise_more_than_targets():
    config = qlora.QLoRAConfig(lora=lora.LoRAConfig(target_modules=("q_proj", "v_proj")))
    blocks, targets = (memory.estimate("llama-3.2-1b", memory.Setup(method="qlora", method_config=config,
                       precision="nf4", quantised_layers=layers)).breakdown["weights"]
                       for layers in memory.QUANTISED_LAYERS)  # fmt: skip
    assert blocks < targets


def test_a_quantised_head_saves_nothing_more():
    """Frozen 4-bit head over a bf16 QLoRA model on the CPU: the saved bytes are those of the 16-bit head."""
    real = _real_qlora("all-linear", tied=False, head=True).to(torch.bfloat16).train()
    for module in real.modules():
        if isinstance(module, qlora.Linear4bit):
            module.compute_dtype = torch.bfloat16
    measured = saved(real, batch_for("llama"), "bf16")
    estimate = estimated(real, "qlora", "nf4", quantise_head=True)
    assert estimate.saved_bytes == pytest.approx(measured, rel=0.02)
    assert estimate.breakdown["logits_and_loss"] >= estimated(real, "qlora", "nf4").breakdown["logits_and_loss"]


# -- 2. gradient accumulation ---------------------------------------------------------------------------------------
def test_accumulation_keeps_the_gradients_through_the_forward_pass():
    one, four = (memory.estimate("llama-3.2-1b", memory.Setup(method="full", batch_size=1, seq_len=1024,
                                                              grad_accum_steps=k)) for k in (1, 4))  # fmt: skip
    forward = "forward and backward"
    assert "gradients" not in one.phases[forward]
    assert four.phases[forward] == {**one.phases[forward], "gradients": one.breakdown["gradients"]}
    assert four.phases["optimizer step"] == one.phases["optimizer step"]
    assert four.peak == sum(four.phases[forward].values()) > one.peak


# -- the cuBLAS workspaces ------------------------------------------------------------------------------------------
def test_gpu_adds_two_cublas_workspaces_to_both_phases():
    plain, h200 = (memory.estimate("llama-3.2-1b", memory.Setup(method="full", seq_len=1024, gpu=gpu))
                   for gpu in (None, "H200"))  # fmt: skip
    assert "cublas_workspace" not in plain.breakdown
    assert h200.breakdown["cublas_workspace"] == 2 * 32 * 2**20 == 2 * memory.CUBLAS_WORKSPACE_BYTES["H100"]
    assert h200.peak - plain.peak == 64 * 2**20
    for phase in h200.phases.values():
        assert phase["cublas_workspace"] == 64 * 2**20
    assert "cublas_workspace" in h200.table().index
    assert memory.CUBLAS_WORKSPACE_BYTES["A100"] == 4096 * 1024 * 2 + 16 * 1024 * 8


# -- nothing changes when the options are left alone --------------------------------------------------------------
def test_defaults_leave_the_estimate_as_it_was():
    setup = memory.Setup(method="lora")
    explicit = memory.Setup(method="lora", grad_accum_steps=1, padding=0.0, loss="transformers", gpu=None,
                            quantised_layers="blocks", quantise_head=False, loss_chunk_tokens=1024)  # fmt: skip
    assert memory.estimate("smollm2-135m", setup) == memory.estimate("smollm2-135m", explicit)
    assert "grad_accum_steps" not in setup.settings()
    assert memory.Setup(grad_accum_steps=4, gpu="H200").settings()["grad_accum_steps"] == 4


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"grad_accum_steps": 0}, "grad_accum_steps must be a positive integer"),
     ({"grad_accum_steps": -2}, "grad_accum_steps must be a positive integer"),
     ({"grad_accum_steps": 2.0}, "grad_accum_steps must be a positive integer"),
     ({"padding": 1.0}, r"padding is the share of padded tokens in a batch, in \[0, 1\)"),
     ({"padding": -0.1}, "padding is the share"), ({"padding": True}, "padding is the share"),
     ({"padding": "20%"}, "padding is the share"),
     ({"loss": "focal"}, "Unknown loss 'focal'"),
     ({"loss": "bf16"}, "loss='bf16' does not apply with precision='bf16-mixed'"),
     ({"loss": "bf16", "precision": "fp32"}, "the logits are fp32"),
     ({"loss_chunk_tokens": 512}, "loss_chunk_tokens applies to loss='chunked' only"),
     ({"loss": "chunked", "loss_chunk_tokens": 0}, "loss_chunk_tokens must be a positive integer"),
     ({"quantise_head": True, "method": "lora"}, "quantise_head=True applies to a quantised base"),
     ({"quantised_layers": "targets", "method": "lora", "precision": "bf16"}, "applies to a quantised base"),
     ({"quantised_layers": "all"}, "Unknown quantised_layers 'all'"),
     ({"gpu": "RTX 9090"}, "Unknown gpu 'RTX 9090'"),
     ({"gpu": "H100", "device": "cpu"}, "names a CUDA GPU")],
)  # fmt: skip
def test_bad_options_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory.Setup(**kwargs)


def test_options_that_do_not_apply_to_the_model():
    with pytest.raises(ValueError, match="applies to a language model's head"):
        memory.estimate("bert-base", memory.Setup(method="lora", loss="chunked"))
    with pytest.raises(ValueError, match="tied to the input embeddings"):
        memory.estimate("llama-3.2-1b", memory.Setup(method="qlora", precision="nf4", quantise_head=True))
    config = lora.LoRAConfig(modules_to_save=("lm_head",))
    with pytest.raises(ValueError, match="the head trains"):
        memory.estimate(llama(tied=False).config, memory.Setup(method="lora", method_config=config, precision="nf4",
                                                               quantise_head=True))  # fmt: skip
    with pytest.raises(ValueError, match="adapts none"):
        memory.estimate("smollm2-135m", memory.Setup(method="prompt", precision="nf4", quantised_layers="targets"))
    with pytest.raises(ValueError, match="quantise_head must be True or False"):
        memory.Setup(method="qlora", precision="nf4", quantise_head="yes")
    with pytest.raises(ValueError, match="has no output head"):
        memory.estimate("bert-base", memory.Setup(method="lora", precision="nf4", quantise_head=True))
