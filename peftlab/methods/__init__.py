"""PEFT methods, one module per family. Each has config dataclasses and ``apply(model, config) -> model``.

``apply`` freezes what must be frozen, adds what is trained, and returns a model that trains with
:func:`peftlab.train.train` like any other. The families:

* :mod:`~peftlab.methods.selective`: full fine-tuning, Freeze (top-k blocks), BitFit (biases);
* :mod:`~peftlab.methods.prompt`: prompt tuning and P-tuning (soft prompts at the input);
* :mod:`~peftlab.methods.prefix`: prefix tuning and P-tuning v2 (keys and values in every layer);
* :mod:`~peftlab.methods.adapter`: Houlsby bottleneck adapters;
* :mod:`~peftlab.methods.lora`: LoRA, rsLoRA, LoRA-FA, LoRA+; merge and peft's adapter format;
* :mod:`~peftlab.methods.qlora`: LoRA on an NF4 base (:mod:`peftlab.quant` builds NF4 from scratch);
* :mod:`~peftlab.methods.adalora`: AdaLoRA, ΔW = PΛQ with a rank budget (trained through the loop's hooks:
  an orthogonality term in the loss, rank allocation after each step);
* :mod:`~peftlab.methods.lora_drop`: LoRA-drop, layers ranked by their LoRA output, the rest sharing one LoRA;
* :mod:`~peftlab.methods.ia3`: (IA)³ scaling vectors.

:func:`apply_method` applies one by name (``"lora"``) with the family's default settings: the one way that the
memory estimator and the explorers pick a method.
"""

from __future__ import annotations

from torch import nn

from peftlab.methods import adapter, ia3, lora, prefix, prompt, selective
from peftlab.models import family

METHOD_NAMES = ("full", "freeze", "bitfit", "prompt", "ptuning", "prefix", "adapter", "lora", "qlora", "ia3")
#: LoRA's default targets per family: the query and value projections, as in Hu et al. (2021).
LORA_TARGETS = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value")}


def default_config(method: str, model: nn.Module):
    """The config a method gets when none is given. QLoRA adapts every linear layer, as in Dettmers et al. (2023)."""
    if method not in METHOD_NAMES:
        raise ValueError(f"Unknown method {method!r}; use one of {', '.join(METHOD_NAMES)}.")
    if method in ("lora", "qlora"):
        targets = lora.ALL_LINEAR if method == "qlora" else LORA_TARGETS[family(model, needed_by="LoRA's defaults")]
        return lora.LoRAConfig(r=8, alpha=16, target_modules=targets)
    return {
        "full": selective.FullConfig,
        "freeze": selective.FreezeConfig,
        "bitfit": selective.BitFitConfig,
        "prompt": prompt.PromptTuningConfig,
        "ptuning": prompt.PTuningConfig,
        "prefix": prefix.PrefixTuningConfig,
        "adapter": adapter.AdapterConfig,
        "ia3": ia3.IA3Config,
    }[method]()


MODULES = {"full": selective, "freeze": selective, "bitfit": selective, "prompt": prompt, "ptuning": prompt,
           "prefix": prefix, "adapter": adapter, "lora": lora, "qlora": lora, "ia3": ia3}  # fmt: skip


def apply_method(model: nn.Module, method: str, config=None) -> nn.Module:
    """Apply a method by name; ``config`` defaults to :func:`default_config`. For ``"qlora"`` this applies the
    LoRA part only (it works on the meta device, for counting); the 4-bit base is :func:`peftlab.methods.qlora.apply`
    on a real model, and a matter of precision for :mod:`peftlab.memory`."""
    config = config if config is not None else default_config(method, model)
    return MODULES[method].apply(model, config)
