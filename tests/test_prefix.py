"""Prefix tuning and P-tuning v2: equal to peft 0.21 on the same weights, counts from the formulas, the cache layout
under grouped-query attention, fold, training moves only the prefix (and head), meta-device counting, the errors."""

import inspect

import peft
import pytest
import torch
from helpers import assert_trains_and_leaves_the_base_bit_identical, call_reference, reference_break
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    DistilBertConfig,
    DistilBertModel,
    DynamicCache,
    LlamaForCausalLM,
    LlamaModel,
    Qwen2Config,
)

from peftlab import compat, memory, models
from peftlab.methods import prefix, prompt
from peftlab.params import count_parameters, parameter_table

#: peft refuses BERT's prefix under transformers >= 5.24 (a strict expected failure there; notebook 05's pitfall).
BERT_BREAK = compat.PEFT_PREFIX_TUNING_ON_BERT
# (tiny architecture, peftlab task, peft task type); llama and qwen2 use grouped-query attention (4 heads, 2 KV heads)
CASES = [
    ("llama", "causal_lm", "CAUSAL_LM"),
    ("qwen2", "causal_lm", "CAUSAL_LM"),
    ("gpt2", "causal_lm", "CAUSAL_LM"),
    pytest.param("bert", "classification", "SEQ_CLS", marks=reference_break(BERT_BREAK)),
]
N, H = 4, 7  # virtual tokens, width of the reparametrisation MLP


def tiny(arch: str, task: str):
    """peftlab's tiny models, and a Qwen2 of the same size (2 layers, d = 32, 4 heads, 2 KV heads)."""
    if arch != "qwen2":
        return models.tiny_model(arch, task)
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def make_batch(task: str) -> dict:
    """Two sequences of 6 tokens, the second right-padded after 4; token labels for LMs, classes for classifiers."""
    input_ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100) if task == "causal_lm" else torch.tensor([0, 2])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def head_size(model) -> int:
    head = prompt.classification_head(model)
    return sum(p.numel() for p in head.parameters()) if head is not None else 0


def dims(model) -> tuple[int, int, int]:
    """Layers L, hidden size d and d_kv = n_kv_heads · head_dim, read from the config by hand."""
    c = model.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return c.num_hidden_layers, c.hidden_size, kv_heads * (c.hidden_size // heads)


@pytest.mark.parametrize("reparametrize", [False, True], ids=["direct", "mlp"])
@pytest.mark.parametrize(("arch", "task", "task_type"), CASES)
def test_prefix_tuning_equals_peft_with_the_same_prefix(arch, task, task_type, reparametrize):
    theirs = peft.get_peft_model(
        tiny(arch, task),
        peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=N, prefix_projection=reparametrize,
                                encoder_hidden_size=H),
    ).eval()  # fmt: skip
    L, _, d_kv = dims(theirs)
    # peft's MLP input rows are d_kv wide (not d) under grouped-query attention: ask for the same width
    config = prefix.PrefixTuningConfig(N, reparametrize=reparametrize, hidden_size=H, embedding_dim=d_kv,
                                       train_head=task_type == "SEQ_CLS")  # fmt: skip
    ours = prefix.apply(tiny(arch, task), config).eval()
    ours.prefix_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())  # same names and layout
    direct = L * 2 * N * d_kv
    formula = N * d_kv + d_kv * H + H + H * 2 * L * d_kv + 2 * L * d_kv if reparametrize else direct
    assert prefix.closed_form_count(ours.base_model, config) == formula
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0] == formula + head_size(ours.base_model)

    batch = make_batch(task)
    with torch.no_grad():
        mine = ours(**batch)
        assert_the_prefix_enters(ours, batch, mine.logits)
        reference = call_reference(BERT_BREAK, lambda: theirs(**batch))
    # fp32 and the same operations; peft runs the MLP on a batch-expanded copy, which may differ in the last bit
    assert_close(mine.logits, reference.logits, atol=1e-5, rtol=0)
    assert_close(mine.loss, reference.loss, atol=1e-5, rtol=0)
    if task == "causal_lm":  # the prefix is not in the sequence: logits for the T real tokens only
        assert mine.logits.shape[:2] == batch["input_ids"].shape


def assert_the_prefix_enters(model: prefix.PrefixTunedModel, batch: dict, logits: torch.Tensor) -> None:
    """peftlab's side of a comparison, checked on its own: finite logits, one row per real token (or example),
    and not the frozen base's logits (the prefix reaches the attention)."""
    base_logits = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all() and logits.shape == base_logits.shape
    assert not torch.allclose(logits, base_logits, atol=1e-4)


@reference_break(BERT_BREAK)
def test_p_tuning_v2_is_peft_prefix_tuning_without_projection_for_classification():
    ours = prefix.apply(models.tiny_model("bert", task="classification"), prefix.PTuningV2Config(N)).eval()
    theirs = peft.get_peft_model(
        models.tiny_model("bert", task="classification"),
        peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N, prefix_projection=False),
    ).eval()
    ours.prefix_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    L, _, d_kv = dims(ours)
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0] == L * 2 * N * d_kv + 32 * 3 + 3
    batch = make_batch("classification")
    with torch.no_grad():
        mine = ours(**batch).logits
        assert_the_prefix_enters(ours, batch, mine)
        assert_close(mine, call_reference(BERT_BREAK, lambda: theirs(**batch)).logits, atol=1e-5, rtol=0)


def test_the_prefix_is_a_dynamic_cache_with_kv_heads_under_grouped_query_attention():
    model = prefix.apply(models.tiny_model("llama"), prefix.PrefixTuningConfig(N, reparametrize=False))
    cache = model.past_key_values(batch_size=3)
    assert isinstance(cache, DynamicCache) and len(cache.layers) == 2
    assert cache.get_seq_length() == N  # so the model numbers the real tokens from N
    flat = model.prefix_encoder.embedding.weight  # (n, 2·L·d_kv), laid out [layer][key, value][head][dim]
    for layer_index, layer in enumerate(cache.layers):
        assert layer.keys.shape == layer.values.shape == (3, 2, N, 8)  # 2 KV heads of 8, not 4 query heads
        per_token = flat.view(N, 2, 2, 2, 8)[:, layer_index]  # (n, key/value, head, dim)
        assert_close(layer.keys[1], per_token[:, 0].transpose(0, 1), atol=0, rtol=0)
        assert_close(layer.values[2], per_token[:, 1].transpose(0, 1), atol=0, rtol=0)


def test_the_trained_parameters_are_named_as_the_prefix_kind():
    model = prefix.apply(models.tiny_model("bert", task="classification"), prefix.PTuningV2Config(N))
    table = parameter_table(model)
    assert set(table.loc[table["trainable"], "kind"]) == {"prefix", "head"}
    assert set(table.loc[table["kind"] == "prefix", "name"]) == {"prefix_encoder.embedding.weight"}


def test_fold_keeps_the_logits_and_drops_the_mlp():
    config = prefix.PrefixTuningConfig(N, hidden_size=H)
    model = prefix.apply(models.tiny_model("llama"), config).eval()
    batch = make_batch("causal_lm")
    with torch.no_grad():
        before = model(**batch).logits
    total_before = count_parameters(model).total
    assert prefix.fold(model) is model
    with torch.no_grad():
        after = model(**batch).logits
    assert_close(after, before, atol=1e-6, rtol=0)  # the same MLP output, computed once instead of every call
    L, _, d_kv = dims(model)
    assert [name for name, _ in model.named_parameters() if "prefix" in name] == ["prefix_encoder.embedding.weight"]
    assert count_parameters(model).trainable == L * 2 * N * d_kv
    assert total_before - count_parameters(model).total == prefix.closed_form_count(model, config) - L * 2 * N * d_kv
    assert prefix.fold(model) is model  # nothing left to fold


@pytest.mark.parametrize(
    ("arch", "task", "config"),
    [
        ("llama", "causal_lm", prefix.PrefixTuningConfig(N, hidden_size=16)),
        ("gpt2", "causal_lm", prefix.PrefixTuningConfig(N, reparametrize=False)),
        ("bert", "classification", prefix.PTuningV2Config(N)),
    ],
    ids=["prefix-mlp-llama", "prefix-direct-gpt2", "p-tuning-v2-bert"],
)
def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(arch, task, config):
    assert_trains_and_leaves_the_base_bit_identical(prefix.apply, arch, task, config)


def test_counting_on_the_meta_device_needs_no_weights():
    direct = prefix.PrefixTuningConfig(20, reparametrize=False)
    model = prefix.apply(models.meta_model("llama-2-7b"), direct)
    assert count_parameters(model).trainable == 32 * 2 * 20 * 4096
    model = prefix.apply(models.meta_model("llama-3-8b"), direct)  # 8 KV heads of 128: d_kv = 1024, not 4096
    assert count_parameters(model).trainable == 32 * 2 * 20 * 1024
    reparametrized = prefix.PrefixTuningConfig(20, hidden_size=512)
    model = prefix.apply(models.meta_model("llama-3-8b"), reparametrized)
    d, h, out = 4096, 512, 2 * 32 * 1024
    assert count_parameters(model).trainable == 20 * d + d * h + h + h * out + out
    # peft's own example: bert-base, 20 virtual tokens, SEQ_CLS, no projection -> 370,178 trainable (with the head)
    model = prefix.apply(models.meta_model("bert-base", task="classification"), prefix.PTuningV2Config(20))
    assert count_parameters(model).trainable == 370_178


def test_bad_configs_say_what_to_change():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer of at least 1, got 0"):
        prefix.PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="at least 1"):
        prefix.PTuningV2Config(num_virtual_tokens=-1)
    with pytest.raises(ValueError, match=r"hidden_size .* must be at least 1, got 0"):
        prefix.PrefixTuningConfig(hidden_size=0)


def test_bad_calls_say_what_to_change():
    distilbert = DistilBertModel(DistilBertConfig(vocab_size=128, dim=32, n_layers=1, n_heads=4, hidden_dim=64))
    message = r"knows the module layouts of bert, gpt2, llama, mistral, qwen2 models, not of DistilBertModel"
    with pytest.raises(ValueError, match=message):
        prefix.apply(distilbert, prefix.PrefixTuningConfig(N))
    with pytest.raises(ValueError, match=r"has no classification head .*: set train_head=False"):
        prefix.apply(models.tiny_model("llama"), prefix.PTuningV2Config(N, train_head=True))
    checkpointed = models.tiny_model("llama")
    memory.enable_checkpointing(checkpointed)
    with pytest.raises(ValueError, match="gradient checkpointing drops: turn it off"):
        prefix.apply(checkpointed, prefix.PrefixTuningConfig(N))
    with pytest.raises(TypeError, match="PrefixTuningConfig or PTuningV2Config"):
        prefix.apply(models.tiny_model("llama"), prompt.PromptTuningConfig(N))
    with pytest.raises(TypeError, match="fold takes the PrefixTunedModel"):
        prefix.fold(models.tiny_model("llama"))
    bert = prefix.apply(models.tiny_model("bert", task="classification"), prefix.PTuningV2Config(100))
    with pytest.raises(ValueError, match=r"100 virtual tokens \+ 40 input tokens = 140 positions"):
        bert(input_ids=torch.ones(1, 40, dtype=torch.long))


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "classification")])
def test_the_prefix_goes_in_through_the_keyword_the_installed_transformers_takes(arch, task, recwarn):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40): peftlab reads the
    keyword from the signature, so neither name ever warns from peftlab's own call."""
    model = prefix.apply(models.tiny_model(arch, task), prefix.PTuningV2Config(N, train_head=task != "causal_lm"))
    backbone = model.base_model.base_model  # transformers' backbone under the task head (BERT's head takes **kwargs)
    accepted = inspect.signature(type(backbone).forward).parameters
    assert compat.cache_keyword(model.base_model) == ("cache" if "cache" in accepted else "past_key_values")
    with torch.no_grad():
        model(**make_batch(task))
    deprecations = [w for w in recwarn if issubclass(w.category, FutureWarning | DeprecationWarning)]
    assert not deprecations, [str(w.message) for w in deprecations]


def test_a_model_that_takes_no_cache_is_refused_before_it_changes():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match=r"takes no KV cache .*peftlab\.methods\.prompt"):
        compat.cache_keyword(NoCache())


def test_a_transformers_model_whose_attention_takes_no_cache_is_refused_before_it_changes():
    class NoCacheBackbone(LlamaModel):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask)

    class NoCacheLM(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.model = NoCacheBackbone(config)

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    model = NoCacheLM(models.tiny_model("llama").config)
    with pytest.raises(TypeError, match=r"NoCacheLM\.forward takes no KV cache .* cannot enter its attention"):
        prefix.apply(model, prefix.PrefixTuningConfig(N))
    assert all(p.requires_grad for p in model.parameters()), "refused, but the model was frozen on the way"


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("bert", "classification")])
def test_checkpointing_turned_on_after_apply_is_refused_in_training_and_harmless_in_eval(arch, task):
    """transformers drops the cache in a checkpointed layer that trains: the prefix would vanish (BERT: silently, no
    gradient reaches it) or break the mask (Llama: a size mismatch deep inside). peftlab says so before the forward."""
    model = prefix.apply(models.tiny_model(arch, task), prefix.PTuningV2Config(N, train_head=task != "causal_lm"))
    batch = make_batch(task)
    with torch.no_grad():
        plain = model.eval()(**batch).logits
    memory.enable_checkpointing(model)
    with torch.no_grad():  # no backward pass to recompute a layer: transformers keeps the cache, so does the prefix
        assert_close(model(**batch).logits, plain, atol=0, rtol=0)
    model.train()
    with pytest.raises(ValueError, match=r"checkpointing was turned on after prefix\.apply.*Turn checkpointing off"):
        model(**batch)
