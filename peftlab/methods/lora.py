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
  longer keeps the full input x, only A x (r numbers per token).
* **LoRA+** (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354) gives B a
  learning rate λ times that of A (λ ≈ 16): :func:`loraplus_optimizer`.

:func:`save` and :func:`load` read and write peft's adapter format (``adapter_config.json`` and
``adapter_model.safetensors``), so an adapter trained here loads with ``peft.PeftModel.from_pretrained`` and the
other way round.
"""

from __future__ import annotations

import difflib
import json
import math
import re
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

ALL_LINEAR = "all-linear"
INITS = ("kaiming", "gaussian")
#: Output heads that ``"all-linear"`` leaves alone (as peft does): the LM head and the classification heads.
HEAD_NAMES = ("lm_head", "classifier", "score")
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

    ``target_modules`` is either a tuple of module-name suffixes, matched as peft does (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``; ``"attention.self.query"`` matches BERT's query layers), or
    ``"all-linear"`` (every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output heads ``lm_head`` / ``classifier`` /
    ``score``), or any other string, which is a regular expression that must match a module's full name.

    ``modules_to_save`` names modules that train in full and are saved with the adapter (peft's field of the same
    name), e.g. ``("classifier",)`` for the new head of a classification model.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    freeze_A: bool = False  # LoRA-FA: A stays at its random init, only B trains
    init: str = "kaiming"  # A ~ Kaiming-uniform (a = √5); "gaussian": A ~ N(0, 1/r²), as peft's init_lora_weights
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the rank) must be a whole number of at least 1, got {self.r!r}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive (the scaling is alpha / r), got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.init not in INITS:
            raise ValueError(f"Unknown init {self.init!r}; use one of {', '.join(INITS)}.")
        targets = self.target_modules
        if not isinstance(targets, str):
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    f"target_modules must be module-name suffixes, e.g. ('q_proj', 'v_proj'); got {targets!r}."
                )
            if ALL_LINEAR in targets:
                if len(targets) > 1:
                    raise ValueError(f"{ALL_LINEAR!r} already targets every linear layer: pass it alone.")
                targets = ALL_LINEAR
        if isinstance(targets, str) and targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as error:
                raise ValueError(
                    f"target_modules={targets!r} is a string, so it is read as a regular expression, and it is not a "
                    f"valid one ({error}). For module names pass a tuple, e.g. ('q_proj', 'v_proj')."
                ) from error
        if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(
                f"modules_to_save must be a tuple of module names, e.g. ('classifier',); got {self.modules_to_save!r}."
            )
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))

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
def _in_out(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` (weight [out, in]) or a GPT-2 ``Conv1D`` (weight [in, out])."""
    rows, columns = layer.weight.shape
    return (rows, columns) if isinstance(layer, Conv1D) else (columns, rows)


def _check_rank(name: str, layer: nn.Module, r: int) -> None:
    in_features, out_features = _in_out(layer)
    if r > min(in_features, out_features):
        raise ValueError(
            f"r={r} is larger than the layer {name} ({in_features} → {out_features}): the update of a "
            f"{out_features}×{in_features} matrix has rank at most {min(in_features, out_features)}. "
            f"Choose r ≤ {min(in_features, out_features)} or leave this layer out of target_modules."
        )


class LoRALinear(nn.Module):
    """A frozen linear layer plus its low-rank update: ``base_layer(x) + B(A(dropout(x))) · scaling``.

    ``base_layer`` is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2, whose weight is stored transposed as
    [in, out]). A and B are bias-free ``nn.Linear`` layers created on the base weight's device and dtype (so that it
    also works on the meta device). After :meth:`merge` the forward pass is the base layer alone.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        name: str = "layer",
    ):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"LoRALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__} ({name}).")
        _check_rank(name, base_layer, r)
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # peft's name for a weight stored as [in, out]
        self.in_features, self.out_features = _in_out(base_layer)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Created, then initialised, in peft's order: with the same seed A gets the same random values as in peft.
        where = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **where)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **where)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    # Code that reads ``layer.weight`` / ``layer.bias`` of a wrapped layer (dtype checks in transformers) sees the base.
    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A, in the layout of the base weight ([out, in]; [in, out] for Conv1D)."""
        delta = self.lora_B.weight @ self.lora_A.weight
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + scaling · B A."""
        if self.merged:
            raise RuntimeError("This LoRA layer is already merged: unmerge it first (merging twice adds ΔW twice).")
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − scaling · B A."""
        if not self.merged:
            raise RuntimeError("This LoRA layer is not merged: there is nothing to unmerge.")
        self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


# ----------------------------------------------------------------------------------------------------------------
# Choosing the layers
# ----------------------------------------------------------------------------------------------------------------
def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """peft's rule: a string is a regular expression on the full name; a tuple holds suffixes of whole components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def _within(name: str, targets: tuple[str, ...]) -> bool:
    """Whether the module ``name``, or a module around it, matches (``classifier.dense`` is within ``classifier``)."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), targets) for i in range(1, len(parts) + 1))


def _modules_outside_lora(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module except the root and the parts of LoRA layers (their base layer, A, B)."""
    wrappers = tuple(f"{name}." for name in lora_layers(model))
    return {name: module for name, module in model.named_modules() if name and not name.startswith(wrappers)}


def _nothing_matched(model: nn.Module, targets, modules: dict[str, nn.Module]) -> ValueError:
    linear = {name: module for name, module in modules.items() if isinstance(module, (nn.Linear, Conv1D))}
    by_kind: dict[str, list[str]] = {}
    for name, module in linear.items():
        last = name.rsplit(".", 1)[-1]
        kind = by_kind.setdefault(type(module).__name__, [])
        if last not in kind:
            kind.append(last)
    available = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in by_kind.items()) or "none"
    wanted = [targets] if isinstance(targets, str) else list(targets)
    candidates = sorted({name.rsplit(".", 1)[-1] for name in linear} | set(linear))
    close = {match for target in wanted for match in difflib.get_close_matches(target, candidates, n=3, cutoff=0.5)}
    hint = f" Close names: {', '.join(sorted(close))}." if close else ""
    return ValueError(
        f"No module of {type(model).__name__} matched target_modules={targets!r}.{hint} "
        f"Its linear layers, by last name: {available}."
    )


def _targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """The layers LoRA wraps, by full name; every error is raised here, before the model is changed."""
    modules = _modules_outside_lora(model)
    if config.target_modules == ALL_LINEAR:
        output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

        def is_head(name: str, module: nn.Module) -> bool:
            return module is output_head or any(part in HEAD_NAMES for part in name.split("."))

        linear = (nn.Linear, Conv1D, LoRALinear)  # LoRALinear: so that applying twice is reported below
        found = {n: m for n, m in modules.items() if isinstance(m, linear) and not is_head(n, m)}
    else:
        found = {name: module for name, module in modules.items() if _matches(name, config.target_modules)}
    if not found:
        raise _nothing_matched(model, config.target_modules, modules)
    for name, module in found.items():
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"LoRA is already applied to {name}: apply it once per model (load a fresh model to start over)."
            )
        if not isinstance(module, (nn.Linear, Conv1D)):
            linear = [n for n, m in modules.items() if n.startswith(f"{name}.") and isinstance(m, (nn.Linear, Conv1D))]
            raise ValueError(
                f"target_modules={config.target_modules!r} matches {name}, a {type(module).__name__}, but LoRA wraps "
                f"linear layers (nn.Linear, Conv1D) only. Target the linear layers inside it instead, e.g. "
                f"{', '.join(n.rsplit('.', 1)[-1] for n in linear[:4]) or 'q_proj, v_proj'}."
            )
        _check_rank(name, module, config.r)
        if _within(name, config.modules_to_save):
            raise ValueError(f"{name} is both a LoRA target and (in) one of the modules_to_save: choose one.")
    return found


def _modules_to_save(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    modules = _modules_outside_lora(model)
    found = {name: module for name, module in modules.items() if _matches(name, config.modules_to_save)}
    for wanted in config.modules_to_save:
        if not any(_matches(name, (wanted,)) for name in found):
            close = difflib.get_close_matches(wanted, [n.rsplit(".", 1)[-1] for n in modules], n=3, cutoff=0.5)
            hint = f" Close names: {', '.join(sorted(set(close)))}." if close else ""
            raise ValueError(f"modules_to_save: no module of {type(model).__name__} is named {wanted!r}.{hint}")
    return found


# ----------------------------------------------------------------------------------------------------------------
# Apply, merge
# ----------------------------------------------------------------------------------------------------------------
def apply(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter, wrap each target layer in a :class:`LoRALinear`, and train A and B (B only with
    ``freeze_A``) plus the ``modules_to_save``. The config is kept as ``model.lora_config`` (for :func:`save`)."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"lora.apply takes a LoRAConfig, got {type(config).__name__}.")
    targets = _targets(model, config)
    heads = _modules_to_save(model, config)
    model.requires_grad_(False)
    for name, layer in targets.items():
        wrapped = LoRALinear(layer, config.r, config.alpha, config.dropout, config.use_rslora, config.init, name=name)
        wrapped.lora_A.requires_grad_(not config.freeze_A)
        model.set_submodule(name, wrapped)
    for head in heads.values():
        head.requires_grad_(True)
    model.lora_config = config
    return model


def _layers_of(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call lora.apply(model, LoRAConfig(...)) first.")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, W ← W + scaling · B A: the forward pass then costs what the base
    model's does. :func:`unmerge` takes it back out."""
    layers = _layers_of(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("The model's LoRA layers are already merged: merging twice adds ΔW twice. Unmerge first.")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, W ← W − scaling · B A (exact up to float rounding)."""
    layers = _layers_of(model)
    if not all(layer.merged for layer in layers.values()):
        raise RuntimeError("The model's LoRA layers are not merged: there is nothing to unmerge (call merge first).")
    for layer in layers.values():
        layer.unmerge()
    return model


# ----------------------------------------------------------------------------------------------------------------
# LoRA+
# ----------------------------------------------------------------------------------------------------------------
def loraplus_optimizer(model: nn.Module, lr: float, ratio: float = 16, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with LoRA+'s learning rates: η for A, ``ratio`` · η for B (Hayou et al., 2024).

    With B = 0 at the start, A and B play different roles, and for wide layers the efficient choice is η_B ≫ η_A.
    The groups are those of peft's ``create_loraplus_optimizer``: B matrices and 1-D parameters (biases of the
    ``modules_to_save``) get ``ratio`` · η, everything else η. Weight decay applies to matrices only.
    Pass it to :func:`peftlab.train.train` as ``optimizer=``; the schedule scales both rates alike.
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


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading in peft's format
# ----------------------------------------------------------------------------------------------------------------
def _adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """What an adapter file holds, by parameter name: every A and B, and the parameters of the modules_to_save."""
    config = getattr(model, "lora_config", None)
    saved = config.modules_to_save if config else ()
    return {name: param for name, param in model.named_parameters()
            if ".lora_A." in name or ".lora_B." in name or _within(name.rsplit(".", 1)[0], saved)}  # fmt: skip


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


def save(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the adapter in peft's format: ``adapter_config.json`` (a ``peft.LoraConfig``) and
    ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``, as ``PeftModel.save_pretrained``).

    ``"all-linear"`` is written as the list of the layers it chose (as peft does). LoRA-FA is a way of training, not
    part of the format: the file holds A and B either way. Refuses a non-empty folder unless ``overwrite``.
    """
    import peft  # imported here: only saving needs it

    layers = _layers_of(model)
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoRAConfig):
        raise ValueError("The model has LoRA layers but no model.lora_config: save models made by lora.apply.")
    directory = Path(directory)
    if directory.is_file():
        raise NotADirectoryError(f"{directory} is a file; save takes a folder.")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty: pass overwrite=True, or choose an empty folder.")
    targets = sorted(layers) if config.target_modules == ALL_LINEAR else config.target_modules
    task_type = _task_type(model)
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        use_rslora=config.use_rslora,
        init_lora_weights=True if config.init == "kaiming" else config.init,
        bias="none",
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        modules_to_save=list(config.modules_to_save) or None,
        task_type=task_type,
        base_model_name_or_path=getattr(model, "name_or_path", None) or None,
        inference_mode=True,
    )
    # peft records the model class when there is no task type (for AutoPeftModel); so do we.
    auto_mapping = None if task_type else {"base_model_class": type(model).__name__,
                                           "parent_library": type(model).__module__}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + name: param.detach().cpu().contiguous() for name, param in _adapter_tensors(model).items()}
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
    targets = saved["target_modules"]
    # The modules_to_save are the modules of the non-LoRA tensors (peft's SEQ_CLS adapters hold the classifier).
    heads = sorted({key.rsplit(".", 1)[0] for key in keys if "lora_" not in key})
    return LoRAConfig(
        r=saved["r"],
        alpha=saved["lora_alpha"],
        dropout=saved.get("lora_dropout", 0.0),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
        use_rslora=saved.get("use_rslora", False),
        init="gaussian" if saved.get("init_lora_weights") == "gaussian" else "kaiming",
        modules_to_save=tuple(heads),
    )


def load(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``model``.

    On a plain model (the usual case) LoRA is first applied as the saved config says; a model that already has LoRA
    must have the same layers, rank and scaling. Only safetensors files are read (unpickling an ``adapter_model.bin``
    can run code). Every tensor must fit: an adapter from a model of another shape is refused, naming the key.
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
    tensors = {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
    config = _read_config(directory, list(tensors))
    layers = lora_layers(model)
    if not layers:
        apply(model, config)
    else:
        for name, layer in layers.items():
            if layer.merged:
                raise RuntimeError(f"{name} is merged: unmerge the model before loading an adapter into it.")
            if (layer.r, layer.scaling) != (config.r, config.scaling):
                raise ValueError(
                    f"{name} has LoRA with r={layer.r}, scaling={layer.scaling:.4g}, the adapter r={config.r}, "
                    f"scaling={config.scaling:.4g}: load the adapter into a plain model instead."
                )
    params = _adapter_tensors(model)
    if unexpected := sorted(set(tensors) - set(params)):
        raise ValueError(f"The adapter has tensors this model has no place for (another model?): {unexpected[:3]}")
    if missing := sorted(set(params) - set(tensors)):
        raise ValueError(f"The adapter lacks tensors this model's LoRA layers need: {missing[:3]}")
    for key in sorted(tensors):
        saved, wanted = tuple(tensors[key].shape), tuple(params[key].shape)
        if saved != wanted:
            raise ValueError(
                f"Shape mismatch for {key}: the adapter has {saved}, the model {wanted}. "
                "Was the adapter trained on another model (or width)?"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)
    return model
