"""AdapterFusion (适配器融合) and AdapterDrop (适配器丢弃): attention over trained adapters, and adapters taken out of
the lower blocks.

**AdapterFusion** — Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning"
(EACL, arXiv:2005.00247). Two stages. Stage 1 (knowledge extraction) trains one bottleneck adapter per source task
(:mod:`peftlab.methods.adapter`), each on its own; they are then frozen. Stage 2 (knowledge composition) learns,
in every position that holds the adapters, an attention over their outputs, on the target task. With h the output
of the sub-layer at that position (the FFN's output projection, before the adapters and the residual add: the
paper's query) and z_n the output of adapter n of N (its bottleneck branch, z_n = W_up f(W_down h + b_down) + b_up):

    s_n = softmax_n( (h W_Q + b_Q) · (z_n W_K + b_K) )                       (attention over the adapters)
    o   = h + Σ_n s_n (z_n W_V + b_V)                                         (values mixed, residual added)

W_Q, W_K, W_V ∈ R^{d×d}. As in AdapterHub's fusion (``residual_before=False``), the residual h is added after the
mix, so that with W_V = I and b_V = 0 a one-hot s picks one adapter exactly: o = h + z_j, adapter j's output.
There is no 1/√d and no temperature: the paper's "static" fusion (AdapterHub also has a temperature annealed from
50 to 1 and a penalty λ‖I − W_V‖², neither used here).

Initialisation (ours, as AdapterHub's BERT init): W_Q, W_K ~ N(0, init_scale²) with init_scale = 0.02 and zero
biases, so every score starts near 0 and the softmax near uniform, s_n ≈ 1/N; W_V = I exactly and b_V = 0, so the
fused layer starts as the mean of the adapters, o ≈ h + (1/N) Σ_n z_n. The adapters stay frozen; only the fusion
parameters (and the task head) train.

Counting: each fusion layer has three d × d matrices with biases, 3d² + 3d parameters. b_K adds nothing: it adds
(h W_Q + b_Q) · b_K to every score alike, and the softmax is blind to a shift common to all n (so 3d² + 2d count).
Since Σ_n s_n = 1, Σ_n s_n (z_n W_V + b_V) = (Σ_n s_n z_n) W_V + b_V: the values are mixed first and projected
once (:class:`Fusion`).

**AdapterDrop** — Rücklé et al., 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers" (EMNLP,
arXiv:2010.11918). :func:`drop` removes the adapters (and the fusion) of the first n blocks: those blocks compute
exactly what the base model computes, no gradient needs to flow below block n while training, and the lower
blocks' work can be shared between tasks at inference. The paper also prunes AdapterFusion: :func:`prune` removes,
in every fusion layer, the adapter with the lowest mean attention weight measured on data (:func:`fusion_weights`),
so that layer no longer computes it.

Adapters reach one model by :func:`copy_adapter` (trained on another copy of the same base, each with its own head)
or by training them on one model one after the other (``adapter.apply(model, config, adapter=name)``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from peftlab.families import transformer_blocks
from peftlab.methods import adapter, layers, targets
from peftlab.methods.adapter import AdapterConfig, AdapterWrapped
from peftlab.methods.adapter import apply as apply_adapter  # beside an argument named `adapter`
from peftlab.methods.layers import AdapterLayer
from peftlab.params import kind_of, layer_of

DEFAULT_FUSION = "fusion"
#: The adapter placements a fusion layer wraps (:class:`~peftlab.methods.adapter.AdapterWrapped` projections).
FUSED_PLACEMENTS = ("attention", "ffn")


@dataclass(frozen=True)
class FusionConfig:
    """Fuse the named ``adapters`` (at least two, already on the model). ``init_scale``: the standard deviation of
    W_Q and W_K (W_V starts as the identity). ``train_head``: train a classifier's new head too; ``None`` (the
    default) does where there is one."""

    adapters: tuple[str, ...]
    init_scale: float = 0.02
    train_head: bool | None = None

    def __post_init__(self):
        names = (self.adapters,) if isinstance(self.adapters, str) else tuple(self.adapters)
        object.__setattr__(self, "adapters", names)
        if len(names) < 2:
            raise ValueError(
                f"AdapterFusion attends over at least two adapters, got {len(names)} ({', '.join(names) or 'none'}): "
                "to use one adapter, activate it (methods.set_active); to fuse, name two or more."
            )
        if len(set(names)) != len(names):
            raise ValueError(f"Each adapter is fused once; {list(names)} names one twice.")
        for name in names:
            layers.check_adapter_name(name)
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale}: W_Q = W_K = 0 would never train.")


def fusion_parameter_count(d: int) -> int:
    """Parameters of one fusion layer of width ``d``: W_Q, W_K, W_V (d² each) and their biases (d each)."""
    return 3 * d * d + 3 * d


class Fusion(nn.Module):
    """One fusion layer: o = h + Σ_n s_n (z_n W_V + b_V), s = softmax_n((h W_Q + b_Q)·(z_n W_K + b_K))."""

    def __init__(self, d: int, init_scale: float = 0.02, device=None, dtype=None):
        super().__init__()
        self.query = nn.Linear(d, d, device=device, dtype=dtype)
        self.key = nn.Linear(d, d, device=device, dtype=dtype)
        self.value = nn.Linear(d, d, device=device, dtype=dtype)
        for linear in (self.query, self.key):
            nn.init.normal_(linear.weight, std=init_scale)
            nn.init.zeros_(linear.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(d, device=device, dtype=dtype))
        nn.init.zeros_(self.value.bias)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h``: [..., d], the sub-layer's output; ``z``: [..., N, d], the adapters' outputs. Returns o [..., d] and
        the attention s [..., N]."""
        scores = (self.key(z) @ self.query(h).unsqueeze(-1)).squeeze(-1)
        s = scores.softmax(dim=-1)
        return h + self.value((s.unsqueeze(-1) * z).sum(dim=-2)), s


def adapter_output(module: adapter.BottleneckAdapter, h: torch.Tensor) -> torch.Tensor:
    """z = W_up f(W_down h + b_down) + b_up: the adapter's branch, without its residual."""
    return module.up(module.act(module.down(h)))


class FusedAdapters(AdapterLayer):
    """An :class:`~peftlab.methods.adapter.AdapterWrapped` projection whose adapters a named fusion mixes (the
    module docstring): ``base_layer`` is the wrapped projection; with the fusion active, its adapters run side by
    side on the projection's output h and ``adapter_fusion[name]`` mixes them; otherwise it is ``base_layer(x)``.
    ``fused[name]`` lists the adapters this layer fuses (:func:`prune` shortens it). With ``keep_weights`` set, the
    last forward pass leaves its attention in ``weights`` ([..., N])."""

    method = "AdapterFusion"

    def __init__(self, base_layer: AdapterWrapped):
        if not isinstance(base_layer, AdapterWrapped):
            raise TypeError(f"AdapterFusion wraps a projection with adapters, not {type(base_layer).__name__}.")
        super().__init__(base_layer)
        self.out_features = base_layer.out_features
        self.adapter_fusion = nn.ModuleDict()
        self.fused: dict[str, list[str]] = {}
        self.keep_weights = False
        self.weights: torch.Tensor | None = None

    def add(self, name: str, config: FusionConfig) -> None:
        self._added(name)
        self.adapter_fusion[name] = Fusion(self.out_features, config.init_scale,
                                           **layers.placement(self.base_layer.base_layer))  # fmt: skip
        self.fused[name] = list(config.adapters)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapter_fusion[name].parameters()) if name in self.adapter_fusion else []

    def set_active(self, names: list[str]) -> None:
        mine = [name for name in names if name in self.adapter_names]
        if mine and len(names) > 1:
            raise ValueError(
                f"The fusion {mine[0]!r} is a whole in itself: activate it alone, not with {len(names) - 1} other "
                "adapter(s)."
            )
        super().set_active(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        applied = self.applied()
        if not applied:
            return self.base_layer(x)
        wrapped = self.base_layer
        h = wrapped.base_layer(x)
        name = applied[0]
        z = torch.stack([adapter_output(wrapped.adapter[n], h) for n in self.fused[name]], dim=-2)
        o, s = self.adapter_fusion[name](h, z)
        if self.keep_weights:
            self.weights = s.detach()
        return o

    def describe(self) -> dict:
        """For the estimator: the number of fused (frozen) adapters and their total width; the wrapped layer's own
        description of trained adapters does not apply while the fusion runs them."""
        applied = self.applied()
        if not applied:
            return {}
        wrapped, fused = self.base_layer, self.fused[applied[0]]
        return {
            "adapter_bottleneck": 0,
            "fusion_adapters": len(fused),
            "fusion_bottleneck": sum(wrapped.adapter[n].down.out_features for n in fused),
        }


def fusion_layers(model: nn.Module, name: str | None = None) -> dict[str, FusedAdapters]:
    """The model's fusion layers by module name (those holding the fusion ``name``, if given)."""
    found = layers.adapter_layers(model, FusedAdapters)
    return {path: layer for path, layer in found.items() if name is None or name in layer.adapter_names}


def _adapter_record(model: nn.Module, needed_by: str) -> layers.Applied:
    applied = layers.record(model)
    if applied is None or applied.method != "adapter":
        carries = f"carries {applied.method}" if applied is not None else "has no adapters"
        raise ValueError(f"{needed_by} works on bottleneck adapters, but {type(model).__name__} {carries}: add them "
                         "first (adapter.apply or fusion.copy_adapter).")  # fmt: skip
    return applied


def _check_known(applied: layers.Applied, name: str, where: str = "this model") -> None:
    if name not in applied.configs:
        close = difflib.get_close_matches(name, list(applied.configs), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"No adapter named {name!r} on {where}.{hint} It has: {', '.join(applied.configs)}. Add it with "
            "adapter.apply(..., adapter=name) or fusion.copy_adapter(source, model, name)."
        )


def _adapted_layers(config: AdapterConfig, blocks: int) -> tuple[int, ...]:
    return tuple(sorted(range(blocks) if config.layers is None else config.layers))


def apply(model: nn.Module, config: FusionConfig, adapter: str = DEFAULT_FUSION) -> nn.Module:
    """Stage 2: a fusion layer at every position that holds the fused adapters; the adapters and the base frozen,
    the fusion (and the head) trained; the fusion becomes the active adapter. Every check runs before the model
    changes: the adapters must be on this model, bottleneck adapters (not another fusion), and placed alike (the
    same positions in the same blocks); their bottlenecks may differ (each z_n lives in R^d)."""
    if not isinstance(config, FusionConfig):
        raise TypeError(f"fusion.apply takes a FusionConfig, got {type(config).__name__}.")
    applied = _adapter_record(model, "AdapterFusion")
    layers.check_can_add(model, "adapter", adapter)
    for name in config.adapters:
        _check_known(applied, name)
        if not isinstance(applied.configs[name], AdapterConfig):
            raise ValueError(f"{name!r} is a fusion, not an adapter: fuse adapters (one level of fusion).")
    unsupported = {name: applied.configs[name].placement for name in config.adapters
                   if not set(applied.configs[name].placement) <= set(FUSED_PLACEMENTS)}  # fmt: skip
    if unsupported:
        raise ValueError(f"AdapterFusion here mixes adapters after a projection (placements {FUSED_PLACEMENTS}); "
                         f"{unsupported} are placed elsewhere: train the adapters to fuse with placement 'ffn' "
                         "(or 'attention', or both).")  # fmt: skip
    _, blocks = transformer_blocks(model, needed_by="AdapterFusion")
    where = {name: (applied.configs[name].placement, _adapted_layers(applied.configs[name], len(blocks)))
             for name in config.adapters}  # fmt: skip
    first = config.adapters[0]
    for name, (placement, adapted) in where.items():
        if set(placement) != set(where[first][0]) or adapted != where[first][1]:
            raise ValueError(
                f"Adapters to fuse must sit in the same places: {first!r} is at {where[first][0]} in blocks "
                f"{list(where[first][1])}, {name!r} at {placement} in blocks {list(adapted)}. Fuse adapters trained "
                "with the same placement and layers."
            )
    paths = [path for path, layer in layers.adapter_layers(model).items()
             if isinstance(layer, AdapterWrapped) and first in layer.adapter_names]  # fmt: skip
    head = targets.task_head(model)
    if config.train_head and head is None:
        raise ValueError(f"train_head=True, but {type(model).__name__} has no classification head: set train_head="
                         "False (or leave it None).")  # fmt: skip
    train_head = head is not None if config.train_head is None else config.train_head
    config = dataclasses.replace(config, train_head=train_head)

    model.requires_grad_(False)
    if config.train_head:
        getattr(model, head).requires_grad_(True)
    for path in paths:
        outer = path.removesuffix(".base_layer")
        if outer != path and isinstance(model.get_submodule(outer), FusedAdapters):  # a fusion beside another
            model.get_submodule(outer).add(adapter, config)
        else:
            layer = FusedAdapters(model.get_submodule(path))
            model.set_submodule(path, layer)
            layer.add(adapter, config)
    layers.remember(model, "adapter", adapter, config)
    layers.set_active(model, adapter)
    return model


@dataclass(frozen=True)
class AdapterFusionConfig:
    """AdapterFusion on one model in a single call, as the method registry, the explorers and the memory estimator
    need it: ``num_adapters`` frozen adapters of ``bottleneck`` after the FFN of every block (stage 1's, untrained
    here: W_up = 0), a fusion over them (stage 2, trained), and AdapterDrop's first ``dropped`` blocks without
    either. It counts and estimates what training stage 2 costs; to train, run the two stages (notebook 07:
    :func:`copy_adapter` the trained adapters, then :func:`apply`)."""

    num_adapters: int = 3
    bottleneck: int = 48
    dropped: int = 0
    init_scale: float = 0.02

    def __post_init__(self):
        for field, least in (("num_adapters", 2), ("bottleneck", 1), ("dropped", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{field} must be a whole number of at least {least}, got {value!r}.")


def apply_adapter_fusion(model: nn.Module, config: AdapterFusionConfig, adapter: str = DEFAULT_FUSION) -> nn.Module:
    """Stage 1's adapters (named ``task1`` … ``taskN``, norms frozen, placement ``"ffn"``), the fusion ``adapter``
    over them, and :func:`drop` of the first ``config.dropped`` blocks. The adapters' bottleneck and the number of
    blocks dropped are checked before the model changes."""
    if not isinstance(config, AdapterFusionConfig):
        raise TypeError(f"apply_adapter_fusion takes an AdapterFusionConfig, got {type(config).__name__}.")
    _, blocks = transformer_blocks(model, needed_by="AdapterFusion")
    if config.dropped >= len(blocks):
        raise ValueError(f"dropped={config.dropped} would leave no adapter: {type(model).__name__} has "
                         f"{len(blocks)} blocks, so drop at most {len(blocks) - 1}.")  # fmt: skip
    names = tuple(f"task{n}" for n in range(1, config.num_adapters + 1))
    stage_1 = AdapterConfig(bottleneck=config.bottleneck, placement="ffn", train_norms=False)
    for name in names:
        apply_adapter(model, stage_1, adapter=name)
    apply(model, FusionConfig(adapters=names, init_scale=config.init_scale), adapter)
    return drop(model, config.dropped)


def _base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own parameters (norms included), by their name without wrappers: no method's, no head's."""
    modules = dict(model.named_modules())
    return {name.replace(".base_layer", ""): param for name, param in model.named_parameters()
            if kind_of(name, modules[name.rsplit(".", 1)[0]]) not in ("adapter", "head")}  # fmt: skip


def copy_adapter(source: nn.Module, model: nn.Module, name: str) -> nn.Module:
    """Stage 1's result onto the fusion model: the adapter ``name``, trained on ``source`` (another copy of the
    same base, with its own head), added to ``model`` with its config and weights.

    Refused: an adapter ``source`` lacks; a source whose base is another model (other weights or shapes: its
    adapter learnt to correct *that* model's activations); an adapter trained with its norms (``train_norms``), whose
    LayerNorms belong to the source model and would not travel (Pfeiffer et al. train adapters with the norms frozen).
    """
    applied = _adapter_record(source, "copy_adapter")
    _check_known(applied, name, where="the source model")
    config = applied.configs[name]
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"{name!r} is a fusion, not an adapter: copy the adapters it fuses.")
    if config.train_norms:
        raise ValueError(
            f"{name!r} was trained with train_norms=True: the LayerNorms it trained are the source model's own, shared "
            "by every adapter there, and do not travel with it. Train adapters for fusion with train_norms=False."
        )
    ours, theirs = _base_parameters(model), _base_parameters(source)
    if ours.keys() != theirs.keys():
        raise ValueError("The source model's base has other modules than this model's: an adapter fits only the base "
                         "it was trained on.")  # fmt: skip
    for param_name, param in ours.items():
        if param.shape != theirs[param_name].shape or not torch.equal(param, theirs[param_name].to(param.device)):
            raise ValueError(f"The source model's base differs from this model's ({param_name}): an adapter fits only "
                             "the base it was trained on (load the same pretrained model for both).")  # fmt: skip
    adapter.apply(model, dataclasses.replace(config, train_head=None), adapter=name)
    for path, layer in layers.adapter_layers(source, AdapterWrapped).items():
        if name in layer.adapter_names:
            model.get_submodule(path).adapter[name].load_state_dict(layer.adapter[name].state_dict())
    return model


def drop(model: nn.Module, n: int) -> nn.Module:
    """AdapterDrop: remove every adapter (and fusion) from the first ``n`` blocks, which then compute what the base
    computes; the model's record keeps the blocks that still hold adapters. Refused: ``n`` more than the model's
    blocks, or so many that no adapter is left (use the base model, or :func:`~peftlab.methods.layers.disabled`)."""
    applied = _adapter_record(model, "AdapterDrop")
    _, blocks = transformer_blocks(model, needed_by="AdapterDrop")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(blocks):
        raise ValueError(f"n must be a number of blocks from 0 to {len(blocks)} ({type(model).__name__} has "
                         f"{len(blocks)} blocks), got {n!r}.")  # fmt: skip
    outermost = {path: layer for path, layer in layers.adapter_layers(model).items()
                 if not any(path.startswith(f"{other}.") for other in layers.adapter_layers(model))}  # fmt: skip
    kept = sorted({layer_of(path) for path in outermost if layer_of(path) >= n})
    if not kept:
        held = sorted({layer_of(path) for path in outermost})
        raise ValueError(f"Dropping the first {n} blocks leaves no adapter (they are in blocks {held}): drop at most "
                         f"{held[-1]}, or use the base model.")  # fmt: skip
    for path, layer in outermost.items():
        if layer_of(path) < n:
            base = layer
            while isinstance(base, AdapterLayer):
                base = base.base_layer
            model.set_submodule(path, base)
    for name, config in applied.configs.items():
        if isinstance(config, AdapterConfig):
            remaining = tuple(i for i in _adapted_layers(config, len(blocks)) if i >= n)
            applied.configs[name] = dataclasses.replace(config, layers=remaining)
    return model


@dataclass
class FusionWeights:
    """Mean attention weights of a fusion, measured on data: ``by_class[path]`` is a [classes, N] tensor, the mean
    of s over the real (unpadded) tokens of each class's examples; ``adapters[path]`` names its N columns;
    ``tokens`` counts the tokens of each class."""

    fusion: str
    labels: list[int]
    adapters: dict[str, list[str]]
    by_class: dict[str, torch.Tensor]
    tokens: torch.Tensor

    def mean(self, path: str) -> torch.Tensor:
        """The mean weight of each adapter in the layer ``path`` over every counted token ([N])."""
        return (self.by_class[path] * self.tokens[:, None]).sum(0) / self.tokens.sum()

    def table(self, label_names: list[str] | None = None) -> pd.DataFrame:
        """One row per (block, class), one column per adapter (empty where a layer no longer fuses it)."""
        rows = []
        for path, weights in self.by_class.items():
            for index, label in enumerate(self.labels):
                row = {"block": layer_of(path), "class": label_names[label] if label_names else label}
                rows.append({**row, **dict(zip(self.adapters[path], weights[index].tolist(), strict=True))})
        return pd.DataFrame(rows).set_index(["block", "class"])


@torch.no_grad()
def fusion_weights(model: nn.Module, batches, fusion: str | None = None) -> FusionWeights:
    """Run ``model`` (in eval mode) over ``batches`` (with ``labels`` and ``attention_mask``) and average each fusion
    layer's attention s over the real tokens of each class (:class:`FusionWeights`). ``fusion``: the active one."""
    applied = _adapter_record(model, "fusion_weights")
    fusion = applied.active[0] if fusion is None else fusion
    found = {path: layer for path, layer in fusion_layers(model, fusion).items() if fusion in layer.applied()}
    if not found:
        raise ValueError(f"{fusion!r} is not an active fusion of this model: apply one (fusion.apply) and activate it.")
    sums: dict[str, dict[int, torch.Tensor]] = {path: {} for path in found}
    tokens: dict[int, float] = {}
    training = model.training
    model.eval()
    for layer in found.values():
        layer.keep_weights = True
    try:
        for batch in batches:
            device = next(model.parameters()).device
            inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            model(**inputs)
            mask = inputs["attention_mask"].float()
            for label in batch["labels"].unique().tolist():
                rows = (batch["labels"] == label).to(device)
                tokens[label] = tokens.get(label, 0.0) + mask[rows].sum().item()
                for path, layer in found.items():
                    weighted = (layer.weights[rows] * mask[rows].unsqueeze(-1)).sum(dim=(0, 1)).float().cpu()
                    sums[path][label] = sums[path].get(label, 0) + weighted
    finally:
        for layer in found.values():
            layer.keep_weights, layer.weights = False, None
        model.train(training)
    labels = sorted(tokens)
    counts = torch.tensor([tokens[label] for label in labels])
    by_class = {path: torch.stack([sums[path][label] for label in labels]) / counts[:, None] for path in found}
    return FusionWeights(fusion, labels, {path: list(layer.fused[fusion]) for path, layer in found.items()},
                         by_class, counts)  # fmt: skip


def prune(model: nn.Module, weights: FusionWeights, per_layer: bool = True) -> dict[str, str]:
    """Remove the least-used adapter from every layer of the fusion ``weights`` measured: per layer, the one with
    the lowest mean weight there (``per_layer``), or else the one lowest on average over all layers, from all.
    The fusion's matrices are shared by its adapters, so the layer then attends over the N − 1 left. Returns the
    adapter removed in each layer. Refused: weights measured on other adapters than the layers fuse now (measure
    again after a prune), and a layer with a single adapter left."""
    found = fusion_layers(model, weights.fusion)
    if set(found) != set(weights.adapters):
        raise ValueError(f"These weights were measured on other layers than the model's fusion {weights.fusion!r} "
                         "has: measure them on this model (fusion_weights).")  # fmt: skip
    for path, layer in found.items():
        if layer.fused[weights.fusion] != weights.adapters[path]:
            raise ValueError(f"{path} fuses {layer.fused[weights.fusion]} now, but the weights were measured on "
                             f"{weights.adapters[path]}: measure them again (fusion_weights).")  # fmt: skip
        if len(weights.adapters[path]) < 2:
            raise ValueError(f"{path} fuses a single adapter ({weights.adapters[path][0]}): there is none to prune.")
    if per_layer:
        least = {path: weights.adapters[path][int(weights.mean(path).argmin())] for path in found}
    else:
        names = weights.adapters[next(iter(found))]
        if any(weights.adapters[path] != names for path in found):
            raise ValueError("The layers fuse different adapters (pruned per layer before): prune per layer.")
        overall = torch.stack([weights.mean(path) for path in found]).mean(0)
        least = dict.fromkeys(found, names[int(overall.argmin())])
    for path, name in least.items():
        found[path].fused[weights.fusion].remove(name)
    return least
