"""PEFT methods, one module per family, and the registry that names them.

Every method is ``apply(model, config, adapter="default") -> model``: it freezes what must be frozen, adds what is
trained, records what it did on the model (``model.peftlab``), and returns a model that trains with
:func:`peftlab.train.train` like any other. The modules:

* :mod:`~peftlab.methods.selective`: full fine-tuning, Freeze (top-k blocks), BitFit (biases);
* :mod:`~peftlab.methods.prompt`: prompt tuning and P-tuning (soft prompts at the input);
* :mod:`~peftlab.methods.prefix`: prefix tuning and P-tuning v2 (keys and values in every layer);
* :mod:`~peftlab.methods.adapter`: bottleneck adapters (Houlsby's two per block, Pfeiffer's one);
* :mod:`~peftlab.methods.fusion`: AdapterFusion over named adapters, AdapterDrop, pruning;
* :mod:`~peftlab.methods.lora`: LoRA, rsLoRA, LoRA-FA, LoRA+; merge and peft's adapter format;
* :mod:`~peftlab.methods.qlora`: LoRA on an NF4 base (:mod:`peftlab.quant` builds NF4 from scratch);
* :mod:`~peftlab.methods.adalora`: AdaLoRA, ΔW = PΛQ with a rank budget (its loss and rank allocator plug into the
  loop's hooks);
* :mod:`~peftlab.methods.lora_drop`: LoRA-drop, layers ranked by their LoRA output, the rest sharing one LoRA;
* :mod:`~peftlab.methods.ia3`: (IA)³ scaling vectors.

Shared by all: :mod:`~peftlab.methods.targets` (which modules a method touches), :mod:`~peftlab.methods.layers`
(the layer contract, named adapters, :func:`disabled`), :mod:`~peftlab.methods.hooks` (what the loop needs).

:data:`REGISTRY` knows every method by name: its config class, its default config for a model family, how to
apply it, the knobs the explorers show, and what the training loop needs from it. Every list of method names,
default config, explorer knob and estimator choice in peftlab is read from it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.families import family_of
from peftlab.methods import adalora, adapter, fusion, ia3, lora, lora_drop, prefix, prompt, qlora, selective
from peftlab.methods.hooks import TrainingHooks
from peftlab.methods.layers import DEFAULT_ADAPTER, disabled, record, set_active
from peftlab.methods.targets import ALL_LINEAR

__all__ = ["REGISTRY", "Method", "apply_method", "default_config", "disabled", "method", "record", "set_active",
           "training_hooks"]  # fmt: skip


@dataclass(frozen=True)
class Method:
    """One method: what it is, how to configure and apply it, and what the loop needs from it.

    ``knobs`` maps each knob the explorers show to the config field it sets (a dotted path into a nested config:
    QLoRA's rank is ``lora.r``). ``apply_on_meta`` applies the method to a model on the meta device, for counting
    (QLoRA quantises real weights, so there it applies the LoRA part; its 4-bit base is a matter of precision for
    :mod:`peftlab.memory`). ``hooks`` gives the training loop's additions for a model that carries the method.
    """

    name: str
    title: str
    paper: str
    config_class: type
    default: Callable[[nn.Module], Any]  # the default config for a model (its family's targets, its head)
    apply: Callable[..., nn.Module]
    knobs: dict[str, str] = dataclasses.field(default_factory=dict)
    apply_on_meta: Callable[..., nn.Module] | None = None
    hooks: Callable[[nn.Module, Any], TrainingHooks] | None = None
    freezes_base: bool = True  # False where the method trains the base's own weights (full, Freeze, BitFit)
    checkpointable: bool = True  # False where gradient checkpointing cannot train it (a prefix: the cache is dropped)
    recorded_as: str = ""  # the method a model it is applied to records, where that is another's (LoRA-FA: LoRA)

    @property
    def record_name(self) -> str:
        """What ``record(model).method`` says of a model this method was applied to."""
        return self.recorded_as or self.name

    def configure(self, config, **knobs):
        """``config`` with the knobs set (``None`` keeps a field as it is); an unknown knob says which there are."""
        unknown = sorted(set(knobs) - set(self.knobs))
        if unknown:
            takes = f"the knobs {', '.join(self.knobs)}" if self.knobs else "no knobs"
            raise ValueError(f"Unknown knob(s) {', '.join(unknown)} for {self.name!r}: it takes {takes}.")
        for knob, value in knobs.items():
            if value is not None:
                config = _replace_path(config, self.knobs[knob].split("."), value)
        return config


def _replace_path(config, path: list[str], value):
    if len(path) == 1:
        return dataclasses.replace(config, **{path[0]: value})
    return dataclasses.replace(config, **{path[0]: _replace_path(getattr(config, path[0]), path[1:], value)})


def _lora(model: nn.Module, **fields) -> lora.LoRAConfig:
    """LoRA's defaults (Hu et al.): r = 8, α = 16, on the family's query and value projections."""
    return lora.LoRAConfig(r=8, alpha=16, target_modules=family_of(model, needed_by="LoRA's defaults").lora_targets,
                           **fields)  # fmt: skip


LORA_KNOBS = {"r": "r", "alpha": "alpha", "target_modules": "target_modules"}
NESTED_LORA_KNOBS = {knob: f"lora.{field}" for knob, field in LORA_KNOBS.items()}

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "full fine-tuning", "", selective.FullConfig, lambda m: selective.FullConfig(),
               selective.apply, freezes_base=False),
        Method("freeze", "Freeze (top-k blocks)", "Yosinski et al., 2014", selective.FreezeConfig,
               lambda m: selective.FreezeConfig(), selective.apply, {"trainable_layers": "trainable_layers"},
               freezes_base=False),
        Method("linear-probe", "linear probe", "Alain & Bengio, 2016, arXiv:1610.01644", selective.LinearProbeConfig,
               lambda m: selective.LinearProbeConfig(), selective.apply, freezes_base=True),
        Method("bitfit", "BitFit", "Ben Zaken et al., 2022, arXiv:2106.10199", selective.BitFitConfig,
               lambda m: selective.BitFitConfig(), selective.apply, freezes_base=False),
        Method("prompt", "prompt tuning", "Lester et al., 2021, arXiv:2104.08691", prompt.PromptTuningConfig,
               lambda m: prompt.PromptTuningConfig(), prompt.apply, {"num_virtual_tokens": "num_virtual_tokens"}),
        Method("ptuning", "P-tuning", "Liu et al., 2021, arXiv:2103.10385", prompt.PTuningConfig,
               lambda m: prompt.PTuningConfig(), prompt.apply, {"num_virtual_tokens": "num_virtual_tokens"}),
        Method("prefix", "prefix tuning", "Li & Liang, 2021, arXiv:2101.00190", prefix.PrefixTuningConfig,
               lambda m: prefix.PrefixTuningConfig(), prefix.apply, {"num_virtual_tokens": "num_virtual_tokens"},
               checkpointable=False),
        Method("ptuning-v2", "P-tuning v2", "Liu et al., 2022, arXiv:2110.07602", prefix.PTuningV2Config,
               lambda m: prefix.PTuningV2Config(), prefix.apply,
               {"num_virtual_tokens": "num_virtual_tokens"}, checkpointable=False),
        Method("adapter", "bottleneck adapters", "Houlsby et al., 2019, arXiv:1902.00751", adapter.AdapterConfig,
               lambda m: adapter.AdapterConfig(), adapter.apply,
               {"bottleneck": "bottleneck", "placement": "placement"}),
        Method("adapter-fusion", "AdapterFusion (with AdapterDrop)",
               "Pfeiffer et al., 2021, arXiv:2005.00247; Rücklé et al., 2021, arXiv:2010.11918",
               fusion.AdapterFusionConfig, lambda m: fusion.AdapterFusionConfig(), fusion.apply_adapter_fusion,
               {"num_adapters": "num_adapters", "bottleneck": "bottleneck", "dropped": "dropped"},
               recorded_as="adapter"),
        Method("lora", "LoRA", "Hu et al., 2021, arXiv:2106.09685", lora.LoRAConfig, _lora, lora.apply, LORA_KNOBS,
               hooks=lora.training_hooks),
        Method("lora-fa", "LoRA-FA", "Zhang et al., 2023, arXiv:2308.03303", lora.LoRAConfig,
               lambda m: _lora(m, freeze_A=True), lora.apply, LORA_KNOBS, hooks=lora.training_hooks,
               recorded_as="lora"),
        Method("lora-plus", "LoRA+", "Hayou et al., 2024, arXiv:2402.12354", lora.LoRAConfig,
               lambda m: _lora(m, loraplus_lr_ratio=16), lora.apply, LORA_KNOBS, hooks=lora.training_hooks,
               recorded_as="lora"),
        Method("qlora", "QLoRA", "Dettmers et al., 2023, arXiv:2305.14314", qlora.QLoRAConfig,
               lambda m: qlora.QLoRAConfig(lora=lora.LoRAConfig(target_modules=ALL_LINEAR)), qlora.apply,
               NESTED_LORA_KNOBS, apply_on_meta=lambda model, config, name: lora.apply(model, config.lora, name),
               hooks=lora.training_hooks),
        Method("adalora", "AdaLoRA", "Zhang et al., 2023, arXiv:2303.10512", adalora.AdaLoRAConfig,
               lambda m: adalora.AdaLoRAConfig(total_steps=1000, target_modules=_lora(m).target_modules), adalora.apply,
               {"r": "init_r", "target_modules": "target_modules"}, hooks=adalora.training_hooks),
        Method("lora-drop", "LoRA-drop", "Zhou et al., 2024, arXiv:2402.07721", lora_drop.LoRADropConfig,
               lambda m: lora_drop.LoRADropConfig(lora_drop.UNIFORM, lora=_lora(m)), lora_drop.apply,
               {**NESTED_LORA_KNOBS, "threshold": "threshold"}, hooks=lora.training_hooks),
        Method("ia3", "(IA)³", "Liu et al., 2022, arXiv:2205.05638", ia3.IA3Config, lambda m: ia3.IA3Config(),
               ia3.apply),
    )
}  # fmt: skip
METHOD_NAMES = tuple(REGISTRY)


def method(name: str) -> Method:
    """The registry entry of a method; an unknown name is refused with the close ones."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), METHOD_NAMES, n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown method {name!r}.{hint} The methods: {', '.join(METHOD_NAMES)}.")
    return REGISTRY[name]


def default_config(name: str, model: nn.Module):
    """The config a method gets for ``model`` when none is given (the family's defaults: LoRA's q, v, ...)."""
    return method(name).default(model)


def apply_method(model: nn.Module, name: str, config=None, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Apply a method by name (``config`` defaults to :func:`default_config`). On the meta device QLoRA applies its
    LoRA part only (counting needs no 4-bit weights): the one way that the estimator and the explorers pick one."""
    entry = method(name)
    config = config if config is not None else default_config(name, model)
    if not isinstance(config, entry.config_class):
        raise TypeError(f"{name} takes a {entry.config_class.__name__}, got {type(config).__name__}.")
    on_meta = any(param.is_meta for param in model.parameters())
    apply = entry.apply_on_meta if on_meta and entry.apply_on_meta else entry.apply
    return apply(model, config, adapter)


def training_hooks(model: nn.Module, train_config) -> TrainingHooks:
    """What the training loop needs for the method ``model`` carries (nothing special for most)."""
    applied = record(model)
    if applied is None or method(applied.method).hooks is None:
        return TrainingHooks()
    return method(applied.method).hooks(model, train_config)
