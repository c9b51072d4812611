"""LoRA: learn a low-rank update of the frozen weights (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685).

A linear layer computes h = W x with W ∈ R^{d_out × d_in}. LoRA freezes W and learns ΔW = γ B A through two small
matrices, B ∈ R^{d_out × r} and A ∈ R^{r × d_in}, with a rank r ≪ min(d_in, d_out):

    h = W x + γ · B A x,        γ = α / r

* **Initialisation**: A is Kaiming-uniform (as ``nn.Linear``, a = √5), B = 0, so ΔW = 0 and training starts exactly
  at the pretrained model.
* **Parameters**: r (d_in + d_out) per layer instead of d_in · d_out (:func:`lora_parameter_count`).
* **Scaling** γ = α / r keeps the size of the update steady when r changes, so the learning rate found for one rank
  works for another. **rsLoRA** (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA", arXiv:2312.03732) shows that α / r shrinks the update too fast at large ranks and uses γ = α / √r.
* **Merging**: W' = W + γ B A is a plain weight of the same shape, so a merged model runs as fast as the base model
  (:func:`merge`, :func:`unmerge`).
* **LoRA-FA** (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation", arXiv:2308.03303) freezes A at
  its random init and trains only B: half the trainable parameters when d_in = d_out, and the backward pass no
  longer keeps the full input x, only A x (r numbers per token). peft's ``create_lorafa_optimizer`` is another
  thing under the same name: it also feeds AdamW the gradient of B times (s² A Aᵀ)⁻¹ (the least-squares B step that
  best matches a full-weight gradient step). At the usual init s² A Aᵀ is close to a multiple of I, which Adam's
  step ignores, so the two differ little at first (``tests/test_lora.py`` shows both).
* **LoRA+** (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354) gives B a
  learning rate λ times that of A (λ ≈ 16): :func:`loraplus_optimizer`.

:func:`save` and :func:`load` read and write peft's adapter format (``adapter_config.json`` and
``adapter_model.safetensors``), so an adapter trained here loads with ``peft.PeftModel.from_pretrained`` and the
other way round. A model holds several named LoRA adapters (``apply(model, config, adapter="sentiment")``), as peft
does: the layer keeps one A and one B per name (``lora_A["sentiment"]``), so a parameter's name is peft's in-memory
name without peft's ``base_model.model.`` prefix (:func:`peft_key`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D

from peftlab.methods import layers, targets
from peftlab.methods.hooks import TrainingHooks
from peftlab.methods.layers import DEFAULT_ADAPTER, AdapterLayer
from peftlab.methods.targets import ALL_LINEAR, LINEAR

INITS = ("kaiming", "gaussian")
#: peft's file names and the prefix of every key in its adapter file (``PeftModel.base_model.model.<module path>``).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
#: adapter_config.json fields of peft features that this module does not implement: an adapter using one is refused.
UNSUPPORTED_PEFT_FIELDS = (
    "use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules",
    "target_parameters", "layer_replication", "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
    "use_bdlora", "arrow_config", "kasa_config", "monteclora_config", "velora_config",
)  # fmt: skip


@dataclass(frozen=True)
class LoRAConfig:
    """Which layers get LoRA, and its rank, scaling, dropout and initialisation.

    ``target_modules``: module-name suffixes, one regular expression, or ``"all-linear"``, matched as peft does
    (:mod:`peftlab.methods.targets`). ``modules_to_save`` names modules that train in full and are saved with the
    adapter (peft's field of the same name); ``None`` (the default) is the new head of a classification model, if
    any (``classifier`` / ``score``, as peft's ``SEQ_CLS``), ``()`` trains no module in full.
    ``freeze_A`` is LoRA-FA. ``loraplus_lr_ratio`` is LoRA+: the training loop gives B this many times A's learning
    rate (:func:`loraplus_optimizer`); it is a way of training, not saved with the adapter.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    freeze_A: bool = False  # LoRA-FA: A stays at its random init, only B trains
    init: str = "kaiming"  # A ~ Kaiming-uniform (a = √5); "gaussian": A ~ N(0, 1/r²), as peft's init_lora_weights
    modules_to_save: tuple[str, ...] | None = None
    loraplus_lr_ratio: float | None = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the rank) must be a whole number of at least 1, got {self.r!r}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive (the scaling is alpha / r), got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.init not in INITS:
            raise ValueError(f"Unknown init {self.init!r}; use one of {', '.join(INITS)}.")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ValueError(f"loraplus_lr_ratio must be positive (LoRA+ uses about 16), got {self.loraplus_lr_ratio}.")
        object.__setattr__(self, "target_modules", targets.normalise(self.target_modules))
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", targets.check_names(self.modules_to_save))

    @property
    def scaling(self) -> float:
        """γ = α / r, or α / √r with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def lora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters LoRA adds to one ``in_features → out_features`` layer: A (r × in) and B (out × r)."""
    return r * (in_features + out_features)


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------
def check_rank(name: str, layer: nn.Module, r: int, field: str = "r") -> None:
    in_features, out_features = targets.in_out(layer)
    if r > min(in_features, out_features):
        raise ValueError(
            f"{field}={r} is larger than the layer {name} ({in_features} → {out_features}): the update of a "
            f"{out_features}×{in_features} matrix has rank at most {min(in_features, out_features)}. "
            f"Choose {field} ≤ {min(in_features, out_features)} or leave this layer out of target_modules."
        )


class LoRALinear(AdapterLayer):
    """A frozen linear layer plus low-rank updates: ``base_layer(x) + Σ_active B(A(dropout(x))) · scaling``.

    ``base_layer`` is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2, whose weight is stored transposed as
    [in, out]). Each named adapter has bias-free ``lora_A[name]`` and ``lora_B[name]``, created on the base weight's
    device and dtype (so that it also works on the meta device); ``r``, ``alpha`` and ``scaling`` are per name, as
    in peft. A merged adapter is in the base weight and skipped by the forward pass.
    """

    method = "LoRA"

    def __init__(self, base_layer: nn.Module, name: str = "layer"):
        if not isinstance(base_layer, LINEAR):
            raise TypeError(f"LoRALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__} ({name}).")
        super().__init__(base_layer)
        self.layer_name = name
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # peft's name for a weight stored as [in, out]
        self.in_features, self.out_features = targets.in_out(base_layer)
        self.where = layers.placement(base_layer)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.freeze_A: dict[str, bool] = {}

    def add(self, adapter: str, config: LoRAConfig) -> None:
        """A new adapter: A Kaiming-uniform (or Gaussian), B = 0, so that ΔW = 0 and the model starts as it was."""
        check_rank(self.layer_name, self.base_layer, config.r)
        self._added(adapter)
        self.r[adapter], self.alpha[adapter], self.scaling[adapter] = config.r, config.alpha, config.scaling
        self.freeze_A[adapter] = config.freeze_A
        self.lora_dropout[adapter] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Created, then initialised, in peft's order: with the same seed A gets the same random values as in peft.
        self.lora_A[adapter] = nn.Linear(self.in_features, config.r, bias=False, **self.where)
        self.lora_B[adapter] = nn.Linear(config.r, self.out_features, bias=False, **self.where)
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A[adapter].weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A[adapter].weight, std=1 / config.r)
        nn.init.zeros_(self.lora_B[adapter].weight)
        self.lora_A[adapter].weight.requires_grad_(not config.freeze_A)  # LoRA-FA: A stays at its random init

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        trained = [self.lora_B[adapter].weight]
        return trained if self.freeze_A[adapter] else [self.lora_A[adapter].weight, *trained]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        for adapter in self.applied():
            result = (
                result
                + self.lora_B[adapter](self.lora_A[adapter](self.lora_dropout[adapter](x))) * (self.scaling[adapter])
            )
        return result

    def delta_weight(self, adapter: str = DEFAULT_ADAPTER) -> torch.Tensor:
        """ΔW = scaling · B A, in the layout of the base weight ([out, in]; [in, out] for Conv1D)."""
        delta = self.lora_B[adapter].weight @ self.lora_A[adapter].weight
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + scaling · B A, for every active adapter."""
        if self.merged:
            raise RuntimeError("This LoRA layer is already merged: unmerge it first (merging twice adds ΔW twice).")
        for adapter in self.active:
            self.base_layer.weight += self.delta_weight(adapter)
            self.merged.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − scaling · B A, for every merged adapter."""
        if not self.merged:
            raise RuntimeError("This LoRA layer is not merged: there is nothing to unmerge.")
        while self.merged:
            self.base_layer.weight -= self.delta_weight(self.merged.pop())

    def describe(self) -> dict:
        applied = self.applied()
        return {"lora_rank": sum(self.r[a] for a in applied),
                "lora_a_trains": any(self.lora_A[a].weight.requires_grad for a in applied)}  # fmt: skip

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}: r={self.r[a]}, scaling={self.scaling[a]:.4g}" for a in self.adapter_names)
        return f"{adapters}; active={self.active}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name."""
    return layers.adapter_layers(model, LoRALinear)


def _layers_of(model: nn.Module) -> dict[str, LoRALinear]:
    found = lora_layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call lora.apply(model, LoRAConfig(...)) first.")
    return found


# ----------------------------------------------------------------------------------------------------------------
# Apply, merge
# ----------------------------------------------------------------------------------------------------------------
def resolved(model: nn.Module, config):
    """``config`` with ``modules_to_save`` decided for this model (``None``: a classifier's new head)."""
    return dataclasses.replace(config, modules_to_save=targets.resolve_modules_to_save(model, config.modules_to_save))


def find_targets(model: nn.Module, config: LoRAConfig, adapter: str, method: str = "lora") -> tuple[dict, dict]:
    """The layers LoRA wraps (or adds ``adapter`` to) and the modules to save, by full name. Every error is raised
    here, before the model changes: names that match nothing, ranks too large, a target inside a module to save,
    another method's layers, an adapter name already taken."""
    layers.check_can_add(model, method, adapter)
    saved = targets.resolve_modules_to_save(model, config.modules_to_save)
    found = targets.find(model, config.target_modules, "LoRA", layer_class=LoRALinear)
    heads = targets.find_modules_to_save(model, saved)
    for name, module in found.items():
        check_rank(name, module, config.r)
        if targets.within(name, saved):
            raise ValueError(f"{name} is both a LoRA target and (in) one of the modules_to_save: choose one.")
    return found, heads


def apply(model: nn.Module, config: LoRAConfig, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze every parameter, wrap each target layer in a :class:`LoRALinear` (or add ``adapter`` to the one there
    is), and train A and B (B only with ``freeze_A``) plus the ``modules_to_save``. The new adapter becomes the
    active one; the config is kept in the model's record (``model.peftlab``), which :func:`save` reads."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"lora.apply takes a LoRAConfig, got {type(config).__name__}.")
    found, heads = find_targets(model, config, adapter)
    config = resolved(model, config)
    model.requires_grad_(False)
    for name, module in found.items():
        layer = module if isinstance(module, LoRALinear) else LoRALinear(module, name=name)
        layer.add(adapter, config)
        if layer is not module:
            model.set_submodule(name, layer)
    for head in heads.values():
        head.requires_grad_(True)
    layers.remember(model, "lora", adapter, config)
    layers.set_active(model, adapter)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every active LoRA update into its base weight, W ← W + scaling · B A: the forward pass then costs what
    the base model's does. :func:`unmerge` takes it back out. A base weight tied to another module (an LM head tied
    to the embeddings) is refused before anything changes."""
    found = layers.merged_layers(model, LoRALinear, merge=True)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for name, layer in found.items():
        shared = [n for n in names_of.get(id(layer.base_layer.weight), []) if not n.startswith(f"{name}.")]
        if shared:
            raise RuntimeError(
                f"{name}'s weight is tied to {shared[0]} (tied embeddings): merging ΔW into it would change that "
                "module too. Untie first (model.config.tie_word_embeddings = False and give the head its own copy: "
                "model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())), then apply LoRA."
            )
    return layers.merge_all(model, LoRALinear)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """:func:`merge`, then every LoRA layer replaced by its base layer (:func:`peftlab.methods.layers.unload`): the
    base architecture with W + scaling · B A, as peft's ``merge_and_unload``. There is no way back."""
    return layers.merge_and_unload(model, LoRALinear)


def unload(model: nn.Module) -> nn.Module:
    """Replace every merged LoRA layer by its base layer (:func:`peftlab.methods.layers.unload`); :func:`merge`
    first."""
    return layers.unload(model, LoRALinear)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, W ← W − scaling · B A (exact up to float rounding)."""
    return layers.unmerge_all(model, LoRALinear)


# ----------------------------------------------------------------------------------------------------------------
# LoRA+
# ----------------------------------------------------------------------------------------------------------------
def loraplus_optimizer(model: nn.Module, lr: float, ratio: float = 16, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with LoRA+'s learning rates: η for A, ``ratio`` · η for B (Hayou et al., 2024).

    With B = 0 at the start, A and B play different roles, and for wide layers the efficient choice is η_B ≫ η_A.
    The groups are those of peft's ``create_loraplus_optimizer``: B matrices and 1-D parameters (biases of the
    ``modules_to_save``) get ``ratio`` · η, everything else η. Weight decay applies to matrices only.
    :func:`peftlab.train.train` builds it by itself for a config with ``loraplus_lr_ratio``; the schedule scales
    both rates alike.
    """
    if lr <= 0 or ratio <= 0:
        raise ValueError(f"lr and ratio must be positive, got lr={lr}, ratio={ratio}.")
    params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not any("lora_" in name for name, _ in params):
        raise ValueError("No trainable LoRA parameters: call lora.apply(model, LoRAConfig(...)) first.")
    groups = [
        {"params": [p for n, p in params if "lora_B" not in n and p.ndim >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for n, p in params if "lora_B" in n], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": [p for n, p in params if "lora_B" not in n and p.ndim < 2], "lr": lr * ratio, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=lr)


def training_hooks(model: nn.Module, train_config) -> TrainingHooks:
    """What the training loop needs for LoRA: LoRA+'s optimizer when the active adapter's config asks for it."""
    config = _config_of(model, layers.record(model).active[0])
    if config.loraplus_lr_ratio is None:
        return TrainingHooks()
    ratio = config.loraplus_lr_ratio
    return TrainingHooks(optimizer=lambda m: loraplus_optimizer(m, train_config.learning_rate, ratio,
                                                                train_config.weight_decay))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading in peft's format
# ----------------------------------------------------------------------------------------------------------------
def peft_key(name: str, adapter: str = DEFAULT_ADAPTER) -> str:
    """A parameter's key in peft's *saved* file: ``<module>.lora_A.<adapter>.weight`` →
    ``base_model.model.<module>.lora_A.weight`` (peft drops the adapter's name on saving). In memory peft's name is
    ``base_model.model.`` + peftlab's name, unchanged."""
    return PEFT_PREFIX + name.replace(f".lora_A.{adapter}.", ".lora_A.").replace(f".lora_B.{adapter}.", ".lora_B.")


def _config_of(model: nn.Module, adapter: str) -> LoRAConfig:
    applied = layers.record(model)
    config = applied.configs.get(adapter) if applied is not None else None
    config = getattr(config, "lora", config)  # QLoRA and LoRA-drop keep LoRA's settings in .lora
    if not isinstance(config, LoRAConfig):
        have = ", ".join(applied.configs) if applied else "none"
        raise ValueError(f"The model has no LoRA adapter named {adapter!r} (it has: {have}).")
    return config


def _adapter_tensors(model: nn.Module, adapter: str, config: LoRAConfig) -> dict[str, nn.Parameter]:
    """What an adapter file holds, by peft's saved key: the adapter's A and B, and the modules_to_save."""
    tensors = {}
    for name, param in model.named_parameters():
        is_lora = f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name
        if is_lora or (config.modules_to_save and targets.within(name.rsplit(".", 1)[0], config.modules_to_save)):
            tensors[peft_key(name, adapter)] = param
    return tensors


def _task_type(model: nn.Module) -> str | None:
    """peft's task type from the transformers class: CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION (bare model), or None."""

    def names(mapping) -> set[str]:
        return {n for value in mapping.values() for n in ([value] if isinstance(value, str) else value)}

    cls = type(model).__name__
    for task, mapping in [("CAUSAL_LM", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("SEQ_CLS", MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
                          ("FEATURE_EXTRACTION", MODEL_MAPPING_NAMES)]:  # fmt: skip
        if cls in names(mapping):
            return task
    return None


def save(model: nn.Module, directory: str | Path, adapter: str = DEFAULT_ADAPTER, overwrite: bool = False) -> Path:
    """Write one adapter in peft's format: ``adapter_config.json`` (a ``peft.LoraConfig``) and
    ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``, as ``PeftModel.save_pretrained``).

    ``"all-linear"`` is written as the list of the layers it chose (as peft does). LoRA-FA and LoRA+ are ways of
    training, not part of the format. Refuses a non-empty folder unless ``overwrite``.
    """
    import peft  # imported here: only saving needs it

    config = _config_of(model, adapter)
    adapted = sorted(name for name, layer in _layers_of(model).items() if adapter in layer.adapter_names)
    directory = Path(directory)
    if directory.is_file():
        raise NotADirectoryError(f"{directory} is a file; save takes a folder.")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty: pass overwrite=True, or choose an empty folder.")
    chosen = adapted if config.target_modules == ALL_LINEAR else config.target_modules
    task_type = _task_type(model)
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=chosen if isinstance(chosen, str) else list(chosen),
        use_rslora=config.use_rslora,
        init_lora_weights=True if config.init == "kaiming" else config.init,
        bias="none",
        fan_in_fan_out=any(lora_layers(model)[name].fan_in_fan_out for name in adapted),
        modules_to_save=list(config.modules_to_save) or None,
        task_type=task_type,
        base_model_name_or_path=getattr(model, "name_or_path", None) or None,
        inference_mode=True,
    )
    # peft records the model class when there is no task type (for AutoPeftModel); so do we.
    auto_mapping = None if task_type else {"base_model_class": type(model).__name__,
                                           "parent_library": type(model).__module__}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: param.detach().cpu().contiguous() for key, param in _adapter_tensors(model, adapter, config).items()
    }
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    peft_config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)
    return directory


def _read_config(directory: Path, keys: list[str]) -> LoRAConfig:
    """The LoRAConfig of a peft adapter folder; adapters that use peft features not implemented here are refused."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: is this a peft adapter folder?")
    saved = json.loads(path.read_text())
    if saved.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {saved.get('peft_type')} adapter, not LoRA: load it with peft.")
    used = [field for field in UNSUPPORTED_PEFT_FIELDS if saved.get(field)]
    if saved.get("bias", "none") != "none":
        used.append(f"bias={saved['bias']!r}")
    if saved.get("init_lora_weights", True) not in (True, False, "gaussian"):
        used.append(f"init_lora_weights={saved['init_lora_weights']!r} (it changes the base weights)")
    if used:
        raise ValueError(
            f"The adapter in {directory} uses {', '.join(used)}, which peftlab's LoRA does not implement: "
            "load it with peft.PeftModel.from_pretrained instead."
        )
    chosen = saved["target_modules"]
    # The modules_to_save are the modules of the non-LoRA tensors (peft's SEQ_CLS adapters hold the classifier).
    heads = sorted({key.rsplit(".", 1)[0] for key in keys if "lora_" not in key})
    return LoRAConfig(
        r=saved["r"],
        alpha=saved["lora_alpha"],
        dropout=saved.get("lora_dropout", 0.0),
        target_modules=chosen if isinstance(chosen, str) else tuple(sorted(chosen)),
        use_rslora=saved.get("use_rslora", False),
        init="gaussian" if saved.get("init_lora_weights") == "gaussian" else "kaiming",
        modules_to_save=tuple(heads),
    )


def load(model: nn.Module, directory: str | Path, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``model`` as
    ``adapter``.

    An adapter name the model lacks is first applied as the saved config says (the usual case: a plain model);
    a name it has must have the same rank and scaling, and gets the saved values. Only safetensors files are read
    (unpickling an ``adapter_model.bin`` can run code). Every check runs before the model changes: every tensor must
    fit, and an adapter from a model of another shape is refused, naming the key.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = ""
        if (directory / "adapter_model.bin").exists():
            pickled = " It has adapter_model.bin, a pickle, which peftlab does not read (unpickling can run code)."
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}.{pickled} Re-save the adapter with safetensors.")
    tensors = load_file(weights)
    if bad := [key for key in tensors if not key.startswith(PEFT_PREFIX)]:
        raise ValueError(f"{weights} is not in peft's format: key {bad[0]!r} does not start with {PEFT_PREFIX!r}.")
    config = _read_config(directory, [key.removeprefix(PEFT_PREFIX) for key in tensors])
    applied = layers.record(model)
    if applied is not None and adapter in applied.configs:
        have = _config_of(model, adapter)
        if (have.r, have.scaling) != (config.r, config.scaling):
            raise ValueError(
                f"The model's adapter {adapter!r} has r={have.r}, scaling={have.scaling:.4g}, the saved one "
                f"r={config.r}, scaling={config.scaling:.4g}: load it under another name (adapter=...) or into a plain "
                "model."
            )
        if any(layer.merged for layer in _layers_of(model).values()):
            raise RuntimeError("The model's LoRA is merged: unmerge it before loading an adapter into it.")
        expected = {key: tuple(p.shape) for key, p in _adapter_tensors(model, adapter, have).items()}
    else:
        found, heads = find_targets(model, config, adapter)  # checks only: the model is not changed yet
        expected = {}
        for name, module in found.items():
            in_features, out_features = targets.in_out(module)
            expected[peft_key(f"{name}.lora_A.{adapter}.weight", adapter)] = (config.r, in_features)
            expected[peft_key(f"{name}.lora_B.{adapter}.weight", adapter)] = (out_features, config.r)
        for name, module in heads.items():
            expected |= {PEFT_PREFIX + f"{name}.{p}": tuple(t.shape) for p, t in module.named_parameters()}
    if unexpected := sorted(set(tensors) - set(expected)):
        raise ValueError(f"The adapter has tensors this model has no place for (another model?): {unexpected[:3]}")
    if missing := sorted(set(expected) - set(tensors)):
        raise ValueError(f"The adapter lacks tensors this model's LoRA layers need: {missing[:3]}")
    for key in sorted(tensors):
        if tuple(tensors[key].shape) != expected[key]:
            raise ValueError(
                f"Shape mismatch for {key}: the adapter has {tuple(tensors[key].shape)}, the model {expected[key]}. "
                "Was the adapter trained on another model (or width)?"
            )
    if applied is None or adapter not in applied.configs:
        apply(model, config, adapter)
    params = _adapter_tensors(model, adapter, _config_of(model, adapter))
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)
    return model
