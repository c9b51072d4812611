"""Bottleneck adapters (Adapter Tuning, 适配器微调): small trained modules inserted into a frozen transformer.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751). An adapter is a
bottleneck with a skip connection: it projects the hidden state h ∈ R^d down to m ≪ d dimensions, applies a
non-linearity f, projects back up, and adds the result to its input:

    adapter(h) = h + W_up f(W_down h + b_down) + b_up,      W_down ∈ R^{m×d}, W_up ∈ R^{d×m}

so one adapter has 2dm + d + m parameters (:func:`adapter_parameter_count`). Houlsby places two adapters in every
block, *sequentially*: one after the attention output projection and one after the feed-forward output
projection, each before the residual add (and before BERT's LayerNorm). Here each is inserted by wrapping that
projection: ``AdapterWrapped(base_layer)(x) = adapter(base_layer(x))``. A model holds several named adapters (the
ground of AdapterFusion); the active ones run one after the other (AdapterHub's "Stack").

=========  ===========================  ============================
family     ``"attention"`` wraps        ``"ffn"`` wraps
=========  ===========================  ============================
Llama      ``self_attn.o_proj``         ``mlp.down_proj``
GPT-2      ``attn.c_proj``              ``mlp.c_proj``
BERT       ``attention.output.dense``   ``output.dense`` (the FFN's)
=========  ===========================  ============================

BERT adds dropout, the residual and LayerNorm *after* its dense projection, and Llama and GPT-2 add the residual
after ``o_proj``/``down_proj``/``c_proj``: in all three, the output of the projection is exactly "before the
residual add".

Pfeiffer et al., 2021 ("AdapterFusion: Non-Destructive Task Composition for Transfer Learning", arXiv:2005.00247)
found one adapter per block enough, after the FFN's Add & Norm: with s = x + FFN(x) the input of BERT's
``output.LayerNorm``, the block computes LN(s + g(LN(s))), g the adapter's bottleneck path W_up f(W_down · + b_down)
+ b_up, its input the normalised state and the same LayerNorm applied again after the adapter's residual add (as
AdapterHub's ``SeqBnConfig`` computes it). The placement ``"ffn_after_norm"`` wraps that LayerNorm
(:class:`AdapterAfterNorm`); only post-norm families (BERT) have one: a pre-norm block (Llama, GPT-2) adds the FFN
to the residual stream with no norm after it, and is refused. :data:`HOULSBY` and :data:`PFEIFFER` name the two
placements.

Initialisation: W_down ~ N(0, init_scale²) and W_up = 0, biases 0, so every adapter starts as the identity and the
adapted model computes exactly what the base model computes (Houlsby initialise near the identity for the same
reason). W_up = 0 still trains: its gradient f(W_down h) is not zero, and W_down's follows after the first step.

Houlsby also train the LayerNorms of each block (``train_norms``). AdapterDrop (Rücklé et al., 2021, "AdapterDrop:
On the Efficiency of Adapters in Transformers", arXiv:2010.11918) drops the adapters of the lower blocks, which
makes training and inference faster: ``layers`` lists the blocks that get adapters (and, with ``train_norms``, the
only blocks whose norms train, so nothing below the lowest adapted block needs a backward pass).

peft has no bottleneck adapter: the parameter counts are checked against the closed form (tests), and the logits
against AdapterHub's ``adapters`` 1.3.0 (``DoubleSeqBnConfig``, ``SeqBnConfig``) in an environment of its own, since
it needs transformers 4.57 (``make reference-adapters``, ``tools/adapters_reference.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.families import family_of, transformer_blocks
from peftlab.methods import layers, targets
from peftlab.methods.layers import DEFAULT_ADAPTER, AdapterLayer
from peftlab.methods.targets import LINEAR
from peftlab.params import kind_of, layer_of

#: Where each placement goes: after the projection of this role (see :mod:`peftlab.families`), or (``None``) around
#: the LayerNorm after the FFN's residual add (:data:`NORM_AFTER_FFN`).
PLACEMENTS = {"attention": "o", "ffn": "down", "ffn_after_norm": None}
HOULSBY = ("attention", "ffn")
PFEIFFER = ("ffn_after_norm",)
#: The LayerNorm after the FFN's residual add, per family that has one (post-norm), relative to a block.
NORM_AFTER_FFN = {"bert": "output.LayerNorm"}
NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapters of ``bottleneck`` dimensions at the places named in ``placement``.

    ``placement``: any of ``"attention"``, ``"ffn"`` (Houlsby: both, :data:`HOULSBY`) and ``"ffn_after_norm"``
    (Pfeiffer: alone, :data:`PFEIFFER`). ``layers``: the block indices that get adapters (``None``:
    every block). ``init_scale``: standard deviation of W_down (W_up starts at zero). ``train_norms``: also train
    the normalisation layers of the adapted blocks. ``train_head``: train a classifier's new head too; ``None`` (the
    default) does where there is one, as every method does.
    """

    bottleneck: int = 64
    placement: tuple[str, ...] = HOULSBY
    non_linearity: str = "relu"
    init_scale: float = 1e-3
    train_norms: bool = True
    layers: tuple[int, ...] | None = None
    train_head: bool | None = None

    def __post_init__(self):
        placement = (self.placement,) if isinstance(self.placement, str) else tuple(self.placement)
        object.__setattr__(self, "placement", placement)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck must be a whole number of at least 1, got {self.bottleneck!r}.")
        unknown = [p for p in self.placement if p not in PLACEMENTS]
        if unknown or not self.placement or len(set(self.placement)) != len(self.placement):
            raise ValueError(
                f"placement must be one or more of {tuple(PLACEMENTS)}, each once (Houlsby: {HOULSBY}, Pfeiffer: "
                f"{PFEIFFER}); got {self.placement}."
            )
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"Unknown non_linearity {self.non_linearity!r}; use one of {', '.join(NON_LINEARITIES)}.")
        if self.init_scale <= 0:
            raise ValueError(
                f"init_scale must be positive, got {self.init_scale}: with W_down = 0 and W_up = 0 neither would "
                "ever get a gradient."
            )
        layers = self.layers
        if layers is not None and (not layers or len(set(layers)) != len(layers) or min(layers) < 0):
            raise ValueError(f"layers must be None or distinct block indices (0 or more), got {layers}.")


def adapter_parameter_count(d: int, m: int) -> int:
    """Parameters of one adapter of width ``d`` and bottleneck ``m``: W_down (m·d), b_down (m), W_up (d·m), b_up (d)."""
    return 2 * d * m + d + m


class BottleneckAdapter(nn.Module):
    """h + W_up f(W_down h + b_down) + b_up, starting as the identity (W_up = 0); see the module docstring."""

    def __init__(self, d: int, m: int, non_linearity: str = "relu", init_scale: float = 1e-3, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.act = NON_LINEARITIES[non_linearity]()
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        nn.init.normal_(self.down.weight, std=init_scale)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdapterWrapped(AdapterLayer):
    """A frozen projection followed by its active adapters: ``adapter_k(… adapter_1(base_layer(x)))``."""

    method = "bottleneck adapters"

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, LINEAR):
            raise TypeError(f"Adapters wrap nn.Linear or Conv1D projections, not {type(base_layer).__name__}.")
        super().__init__(base_layer)
        self.out_features = targets.in_out(base_layer)[1]
        self.adapter = nn.ModuleDict()

    def add(self, name: str, config: AdapterConfig) -> None:
        self._added(name)
        self.adapter[name] = BottleneckAdapter(self.out_features, config.bottleneck, config.non_linearity,
                                               config.init_scale, **layers.placement(self.base_layer))  # fmt: skip

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapter[name].parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        for name in self.applied():
            h = self.adapter[name](h)
        return h

    def describe(self) -> dict:
        return {"adapter_bottleneck": sum(self.adapter[name].down.out_features for name in self.applied())}


class AdapterAfterNorm(AdapterLayer):
    """A frozen LayerNorm with Pfeiffer's adapter around it: LN(s + g(LN(s))), g = the active adapters' bottleneck
    paths (stacked: their total residual change); with W_up = 0, g = 0 and the layer is the LayerNorm."""

    method = "bottleneck adapters"

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, nn.LayerNorm):
            raise TypeError(f"The Pfeiffer placement wraps an nn.LayerNorm, not {type(base_layer).__name__}.")
        super().__init__(base_layer)
        self.out_features = base_layer.normalized_shape[-1]
        self.adapter = nn.ModuleDict()

    add = AdapterWrapped.add
    adapter_parameters = AdapterWrapped.adapter_parameters

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        normed = h = self.base_layer(s)
        names = self.applied()
        if not names:
            return normed
        for name in names:
            h = self.adapter[name](h)
        return self.base_layer(s + (h - normed))

    def describe(self) -> dict:
        return {"norm_adapter_bottleneck": sum(self.adapter[name].down.out_features for name in self.applied())}


def _adapter_sites(model: nn.Module, config: AdapterConfig, blocks_name: str, chosen) -> list[str]:
    """The module paths that get an adapter, checked: each exists and can hold one of width ≥ the bottleneck."""
    family = family_of(model, needed_by="Adapters")
    relative = []
    for p in config.placement:
        if PLACEMENTS[p] is not None:
            relative.append(family.path(PLACEMENTS[p]))
        elif family.name in NORM_AFTER_FFN:
            relative.append(NORM_AFTER_FFN[family.name])
        else:
            raise ValueError(
                f"placement {p!r} (Pfeiffer) needs a LayerNorm after the FFN's residual add, and {family.name} blocks "
                f"are pre-norm, with none: use placement='ffn' (after the FFN's output projection) instead."
            )
    paths = [f"{blocks_name}.{i}.{path}" for i in chosen for path in relative]
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {path}, where placement {config.placement} puts an "
                             "adapter: is the model a standard one of its family?") from None  # fmt: skip
        if isinstance(module, AdapterLayer) and not isinstance(module, AdapterWrapped | AdapterAfterNorm):
            raise ValueError(f"{path} already carries {module.method}: apply one method per model.")
        if isinstance(module, AdapterLayer):
            d = module.out_features
        elif isinstance(module, LINEAR):
            d = targets.in_out(module)[1]
        elif isinstance(module, nn.LayerNorm):
            d = module.normalized_shape[-1]
        else:
            raise ValueError(f"{path} is a {type(module).__name__}, not a projection or a LayerNorm: adapters cannot "
                             "go there.")  # fmt: skip
        if config.bottleneck > d:
            raise ValueError(
                f"bottleneck={config.bottleneck} is wider than the hidden size d={d}: an adapter must be a "
                f"bottleneck, choose 1..{d}."
            )
    return paths


def apply(model: nn.Module, config: AdapterConfig, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze the model, wrap the chosen output projections (or, Pfeiffer's, the LayerNorm after the FFN) with
    adapters (or add ``adapter`` to those there are), and train the adapters (and norms). Every check runs before
    the model changes.

    Works on the meta device (``peftlab.models.meta_model``): the adapters are created where the weights are.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"adapter.apply takes an AdapterConfig, got {type(config).__name__}.")
    layers.check_can_add(model, "adapter", adapter)
    blocks_name, blocks = transformer_blocks(model, needed_by="Adapters")
    chosen = range(len(blocks)) if config.layers is None else config.layers
    out_of_range = [i for i in chosen if i >= len(blocks)]
    if out_of_range:
        raise ValueError(
            f"layers {out_of_range} out of range: {type(model).__name__} has {len(blocks)} blocks, "
            f"choose from 0..{len(blocks) - 1}."
        )
    paths = _adapter_sites(model, config, blocks_name, chosen)

    head = targets.task_head(model)
    if config.train_head and head is None:
        raise ValueError(f"train_head=True, but {type(model).__name__} has no classification head: set train_head="
                         "False (or leave it None).")  # fmt: skip
    config = dataclasses.replace(
        config, train_head=head is not None if config.train_head is None else config.train_head
    )
    model.requires_grad_(False)
    if config.train_head:
        getattr(model, head).requires_grad_(True)
    if config.train_norms:
        modules = dict(model.named_modules())
        for name, param in model.named_parameters():
            in_adapted_block = name.startswith(f"{blocks_name}.") and layer_of(name) in chosen
            if in_adapted_block and kind_of(name, modules[name.rsplit(".", 1)[0]]) == "norm":
                param.requires_grad_(True)
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, AdapterWrapped | AdapterAfterNorm):
            layer = module
        else:
            layer = AdapterAfterNorm(module) if isinstance(module, nn.LayerNorm) else AdapterWrapped(module)
        layer.add(adapter, config)
        if layer is not module:
            model.set_submodule(path, layer)
    layers.remember(model, "adapter", adapter, config)
    layers.set_active(model, adapter)
    return model
