"""AdaLoRA: LoRA whose rank is shared out among the layers while it trains (Zhang et al., 2023, "Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023, arXiv:2303.10512).

LoRA gives every layer the same rank r. AdaLoRA starts every layer at ``init_r`` and, while training, takes rank
away where it matters least, until the whole model holds ``target_r`` per layer *on average*: important layers keep
more, others fewer (:func:`ranks`).

**The update in SVD form.** Each adapted layer learns ΔW = P Λ Q, shaped like a singular value decomposition:

    h = W x + P (λ ⊙ (Q x)) · α / r,      P ∈ R^{d_out×r}, Λ = diag(λ), λ ∈ R^r, Q ∈ R^{r×d_in}

The i-th *triplet* (P_{·i}, λ_i, Q_{i·}) is one rank-one piece of ΔW; removing it is setting λ_i = 0, which keeps P
and Q intact, so a triplet removed too early can come back. Init: λ = 0 (so ΔW = 0: training starts at the
pretrained model), P and Q ~ N(0, 0.02²), as peft. r in α / r is ``init_r`` and stays fixed while triplets are
masked, so masking one triplet does not rescale the others (peft: ``scaling / (ranknum + 1e-5)`` with ranknum =
init_r; the 1e-5 changes the output by a relative 1e-6 and is left out here).

**Trainable parameters** per layer: r (d_in + d_out) for P and Q, plus r for λ (:func:`adalora_parameter_count`).

**Orthogonality.** For PΛQ to behave like an SVD, P and Q are pushed towards orthonormal columns and rows. The
paper adds R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F per layer to the loss with a weight γ (``orth_reg_weight``). peft,
and this module (:func:`orthogonality_loss`, so that the loss is peft's), use the plain Frobenius norm averaged over
the 2L matrices of the L layers: R = (1 / 2L) Σ_layers (‖PᵀP − I‖_F + ‖QQᵀ − I‖_F). Both are 0 exactly when every P
has orthonormal columns and every Q orthonormal rows.

**Importance.** After each backward pass, every entry w of P, λ, Q gets a sensitivity I(w) = |w · ∂L/∂w| (the
first-order change of the loss if w were set to 0), smoothed over steps by two exponential moving averages:

    Ī(t) = β1 Ī(t−1) + (1 − β1) I(t)                    (smoothed sensitivity)
    Ū(t) = β2 Ū(t−1) + (1 − β2) |I(t) − Ī(t)|            (uncertainty)
    s(w) = Ī(t) · Ū(t)

and triplet i's score is S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) (paper eq. 7 to 9).

**Budget.** The total rank b(t) (summed over layers) falls from b_init = L · init_r to b_T = L · target_r with a
cubic schedule (paper eq. 10; :meth:`RankAllocator.budget`):

    b(t) = b_init                                                        t ≤ t_init
    b(t) = b_T + (b_init − b_T) (1 − (t − t_init) / (T − t_final − t_init))³       t_init < t ≤ T − t_final
    b(t) = b_T                                                           t > T − t_final

Every ΔT steps, the triplets with the lowest scores *across all layers* have λ set to 0 so that b(t) are kept. At
step T − t_final the final choice is made and fixed: from then on the same triplets are re-masked after every step
while the kept ones fine-tune.

**Using it.** ``apply`` adds the layers; :class:`RankAllocator` does the bookkeeping after every optimizer step,
exactly as peft's ``model.base_model.update_and_allocate(global_step)``::

    loss = model(**batch).loss + config.orth_reg_weight * orthogonality_loss(model)
    loss.backward()
    optimizer.step()
    allocator.update_and_allocate(model, step)    # step = 1, 2, ..., total_steps
    optimizer.zero_grad()

:func:`peftlab.train.train` runs that loop by itself for a model with AdaLoRA: it asks the method registry for
:func:`training_hooks` (the loss with the orthogonality term, the allocator after each step).

**Same as peft** (tests/test_adalora.py checks each against peft 0.21): the forward pass for the same P, λ, Q; the
trainable parameter count; the budget schedule step by step (and when it masks); the orthogonality term and so the
training loss; the sensitivity, EMAs and triplet score formulas; the final choice being fixed at T − t_final (and, on
the run tested, the very triplets that peft keeps).
**Different:** (1) peft masks every triplet whose score is ≤ the k-th smallest, so ties (all scores 0 before
training, for example) can mask more than asked; here exactly b(t) triplets are kept, the highest-scoring ones
(``torch.topk``). (2) peft also records the choice as ``rank_pattern`` and can shrink the tensors when it saves;
here the choice is the boolean buffer ``rank_mask`` of each layer and the tensors keep their size. (3) Only
``nn.Linear`` and GPT-2 ``Conv1D`` layers, no dropout, no quantised layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.methods import layers, lora, targets
from peftlab.methods.hooks import TrainingHooks
from peftlab.methods.layers import DEFAULT_ADAPTER, AdapterLayer
from peftlab.methods.targets import LINEAR


@dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig:
    """AdaLoRA's ranks, schedule and regulariser (peft's ``AdaLoraConfig`` names in brackets).

    Every layer starts at ``init_r`` and the model ends with ``target_r`` per layer on average after
    ``total_steps`` optimizer steps (``total_step``): ``t_init`` steps of warm-up at full rank (``tinit``), a cubic
    fall of the budget, then ``t_final`` steps with the final ranks fixed (``tfinal``). The allocator masks every
    ``delta_t`` steps (``deltaT``). ``beta1`` and ``beta2`` smooth sensitivity and uncertainty; ``orth_reg_weight``
    is γ. ``alpha`` gives the scaling α / init_r (``lora_alpha``). ``target_modules`` and ``modules_to_save`` (a new
    classification head, say, that trains in full) as in :class:`~peftlab.methods.lora.LoRAConfig`.
    """

    total_steps: int
    init_r: int = 12
    target_r: int = 8
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 16
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        for field in ("total_steps", "init_r", "target_r", "delta_t"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a whole number of at least 1, got {value!r}.")
        for field in ("t_init", "t_final"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be a whole number of at least 0, got {value!r}.")
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only takes rank away. "
                f"Raise init_r to at least {self.target_r} or lower target_r."
            )
        if self.t_init + self.t_final >= self.total_steps:
            raise ValueError(
                f"t_init + t_final = {self.t_init} + {self.t_final} must be less than total_steps={self.total_steps}, "
                "or no step is left for the budget to fall: lower t_init or t_final, or train for more steps."
            )
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not 0 <= value < 1:
                raise ValueError(f"{field} (an EMA factor) must be in [0, 1), got {value!r}; the paper uses 0.85.")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"orth_reg_weight must be at least 0, got {self.orth_reg_weight!r}.")
        # LoRA's checks and normal forms of target_modules ("all-linear", suffixes, or a regex) and modules_to_save.
        normal = self.as_lora_config()
        object.__setattr__(self, "target_modules", normal.target_modules)
        object.__setattr__(self, "modules_to_save", normal.modules_to_save)

    def as_lora_config(self) -> lora.LoRAConfig:
        """The LoRA config that picks the same layers and heads (r = 1 there: ``init_r`` is checked per layer)."""
        return lora.LoRAConfig(r=1, alpha=self.alpha, target_modules=self.target_modules,
                               modules_to_save=self.modules_to_save)  # fmt: skip

    @property
    def scaling(self) -> float:
        """α / init_r."""
        return self.alpha / self.init_r


def adalora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters AdaLoRA adds to one layer: Q (r × in), P (out × r) and λ (r)."""
    return r * (in_features + out_features) + r


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------
class AdaLoRALinear(AdapterLayer):
    """A frozen linear layer plus ΔW = P diag(λ) Q: ``base_layer(x) + P (λ ⊙ (Q x)) · alpha / r``.

    ``rank_mask`` (a boolean buffer of length r) says which triplets the :class:`RankAllocator` keeps; it starts
    all true. The parameters are peft's ``lora_B`` (P), ``lora_E`` (λ, there of shape r × 1) and ``lora_A`` (Q).
    One AdaLoRA adapter per model (its rank budget is the model's).
    """

    method = "AdaLoRA"
    named = False

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, LINEAR):
            raise TypeError(f"AdaLoRALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}.")
        super().__init__(base_layer)
        self.in_features, self.out_features = targets.in_out(base_layer)

    def add(self, adapter: str, config: AdaLoRAConfig) -> None:
        self._added(adapter)
        r, where = config.init_r, layers.placement(self.base_layer)
        self.r, self.alpha, self.scaling = r, config.alpha, config.alpha / r
        self.lora_P = nn.Parameter(torch.empty(self.out_features, r, **where))  # left singular vectors
        self.lora_lambda = nn.Parameter(torch.zeros(r, **where))  # singular values
        self.lora_Q = nn.Parameter(torch.empty(r, self.in_features, **where))  # right singular vectors
        nn.init.normal_(self.lora_P, std=0.02)
        nn.init.normal_(self.lora_Q, std=0.02)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=where["device"]))

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return [self.lora_P, self.lora_lambda, self.lora_Q]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.applied():
            return self.base_layer(x)
        update = ((x @ self.lora_Q.T) * self.lora_lambda) @ self.lora_P.T
        return self.base_layer(x) + update * self.scaling

    def describe(self) -> dict:
        """Saves x and Q·x as LoRA saves x and A·x (plus r numbers for λ, left out)."""
        if not self.applied():
            return {}
        return {"lora_rank": self.r, "lora_a_trains": self.lora_Q.requires_grad}

    def extra_repr(self) -> str:
        return f"r={self.r}, kept={int(self.rank_mask.sum())}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    """The model's AdaLoRA layers by module name."""
    return layers.adapter_layers(model, AdaLoRALinear)


def _layers_of(model: nn.Module) -> dict[str, AdaLoRALinear]:
    found = adalora_layers(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no AdaLoRA layers: call adalora.apply(model, AdaLoRAConfig(...)) first."
        )
    return found


def config_of(model: nn.Module) -> AdaLoRAConfig:
    """The AdaLoRA config in the model's record."""
    applied = layers.record(model)
    if applied is None or applied.method != "adalora":
        raise ValueError("No AdaLoRA on this model: call adalora.apply(model, AdaLoRAConfig(...)) first.")
    return applied.config


def apply(model: nn.Module, config: AdaLoRAConfig, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze every parameter and wrap each target layer in an :class:`AdaLoRALinear` of rank ``init_r``; P, λ and
    Q train, and the ``modules_to_save`` in full. The config is kept in the model's record (for
    :class:`RankAllocator` and the training loop)."""
    if not isinstance(config, AdaLoRAConfig):
        raise TypeError(f"adalora.apply takes an AdaLoRAConfig, got {type(config).__name__}.")
    if adalora_layers(model):
        raise ValueError("AdaLoRA is already applied to this model: apply it once (load a fresh model to start over).")
    # LoRA's choice of layers and heads, with its errors (no match, not linear, a head that is also a target).
    found, heads = lora.find_targets(model, config.as_lora_config(), adapter, method="adalora")
    for name, layer in found.items():
        lora.check_rank(name, layer, config.init_r, field="init_r")
    model.requires_grad_(False)
    for name, layer in found.items():
        wrapped = AdaLoRALinear(layer)
        wrapped.add(adapter, config)
        model.set_submodule(name, wrapped)
    for head in heads.values():
        head.requires_grad_(True)
    saved = targets.resolve_modules_to_save(model, config.modules_to_save)
    layers.remember(model, "adalora", adapter, dataclasses.replace(config, modules_to_save=saved))
    layers.set_active(model, adapter)
    return model


def ranks(model: nn.Module) -> dict[str, int]:
    """The rank each layer keeps now (the triplets of the allocator's last choice): ``init_r`` before the first."""
    return {name: int(layer.rank_mask.sum()) for name, layer in _layers_of(model).items()}


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """R = (1 / 2L) Σ_layers (‖PᵀP − I‖_F + ‖QQᵀ − I‖_F), peft's form of the paper's regulariser (the paper sums
    the squared norms: see the module docstring). Add ``orth_reg_weight · R`` to the task loss."""
    penalties = []
    for layer in _layers_of(model).values():
        identity = torch.eye(layer.r, device=layer.lora_P.device, dtype=layer.lora_P.dtype)
        penalties.append(torch.linalg.matrix_norm(layer.lora_P.T @ layer.lora_P - identity))  # Frobenius
        penalties.append(torch.linalg.matrix_norm(layer.lora_Q @ layer.lora_Q.T - identity))
    return torch.stack(penalties).mean()


# ----------------------------------------------------------------------------------------------------------------
# The rank allocator
# ----------------------------------------------------------------------------------------------------------------
class RankAllocator:
    """Scores every triplet and masks the least important ones to follow the budget schedule.

    Call :meth:`update_and_allocate` after ``loss.backward()`` (and after ``optimizer.step()``) and before
    ``optimizer.zero_grad()``, once per optimizer step, with step = 1, 2, ..., ``total_steps``: it reads the
    gradients. :func:`peftlab.train.train` calls it (see :func:`training_hooks`); by hand, call it as peft's
    ``model.base_model.update_and_allocate(global_step)``.
    """

    def __init__(self, model: nn.Module, config: AdaLoRAConfig | None = None):
        self.config = config or config_of(model)
        found = _layers_of(model)
        self.initial_budget = sum(layer.r for layer in found.values())
        self.target_budget = self.config.target_r * len(found)
        self.sensitivity: dict[str, torch.Tensor] = {}  # Ī per parameter ("<layer>.lora_P", ...)
        self.uncertainty: dict[str, torch.Tensor] = {}  # Ū per parameter

    def budget(self, step: int) -> tuple[int, bool]:
        """(b(step), whether to mask at this step): the cubic schedule of the paper's eq. 10, as peft's
        ``RankAllocator.budget_schedule``."""
        c = self.config
        if step <= c.t_init:
            return self.initial_budget, False
        if step > c.total_steps - c.t_final:
            return self.target_budget, True
        remaining = 1 - (step - c.t_init) / (c.total_steps - c.t_final - c.t_init)
        budget = int((self.initial_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.delta_t == 0

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        """Ī ← β1 Ī + (1 − β1) I and Ū ← β2 Ū + (1 − β2) |I − Ī|, with I = |w · ∂L/∂w| for every entry."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, layer in _layers_of(model).items():
            for part in ("lora_P", "lora_lambda", "lora_Q"):
                param, key = getattr(layer, part), f"{name}.{part}"
                if param.grad is None:
                    raise RuntimeError(
                        f"{key} has no gradient: call update_and_allocate after loss.backward() and before "
                        "optimizer.zero_grad()."
                    )
                sensitivity = (param * param.grad).abs()
                previous = self.sensitivity.get(key, torch.zeros_like(param))
                self.sensitivity[key] = beta1 * previous + (1 - beta1) * sensitivity
                previous = self.uncertainty.get(key, torch.zeros_like(param))
                self.uncertainty[key] = beta2 * previous + (1 - beta2) * (sensitivity - self.sensitivity[key]).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), with s = Ī · Ū, per layer (a vector of length r)."""
        if not self.sensitivity:
            raise RuntimeError("No importance yet: update_and_allocate has not seen a gradient.")
        layer_names = dict.fromkeys(key.rsplit(".", 1)[0] for key in self.sensitivity)

        def s(key: str) -> torch.Tensor:
            return self.sensitivity[key] * self.uncertainty[key]

        return {
            name: s(f"{name}.lora_lambda") + s(f"{name}.lora_P").mean(dim=0) + s(f"{name}.lora_Q").mean(dim=1)
            for name in layer_names
        }

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> None:
        """Keep the ``budget`` highest-scoring triplets of the whole model; set λ = 0 for all the others."""
        scores = self.scores()
        everything = torch.cat(list(scores.values()))
        keep = torch.zeros(len(everything), dtype=torch.bool, device=everything.device)
        keep[everything.topk(budget).indices] = True
        found = _layers_of(model)
        for name, kept in zip(scores, keep.split([len(s) for s in scores.values()]), strict=True):
            found[name].rank_mask.copy_(kept)
        self.apply_masks(model)

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """λ_i ← 0 for every triplet i that the last choice dropped."""
        for layer in _layers_of(model).values():
            layer.lora_lambda.masked_fill_(~layer.rank_mask, 0.0)

    def update_and_allocate(self, model: nn.Module, step: int) -> int:
        """One step of the allocator; returns b(step). Before T − t_final: update the importance and, when the
        schedule says so, mask to b(step). At T − t_final: the final choice (b_T triplets, the importance no longer
        updated). After: re-mask the same triplets (the optimizer step has moved their λ off 0)."""
        final_step = self.config.total_steps - self.config.t_final
        budget, mask_now = self.budget(step)
        if step < final_step:
            self.update_importance(model)
            if mask_now:
                self.mask_to_budget(model, budget)
        elif step == final_step:
            self.mask_to_budget(model, budget)
        else:
            self.apply_masks(model)
        return budget


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def training_hooks(model: nn.Module, train_config) -> TrainingHooks:
    """What :func:`peftlab.train.train` needs for AdaLoRA: a loss with the orthogonality term (the task loss and
    the term are logged apart) and the rank allocator after each optimizer step (it reads the gradients, so before
    they are cleared). ``train_config.max_steps`` must equal ``total_steps``: the budget schedule ends there."""
    config = config_of(model)
    if train_config.max_steps != config.total_steps:
        raise ValueError(
            f"TrainConfig.max_steps={train_config.max_steps} but AdaLoRAConfig.total_steps={config.total_steps}: "
            "the budget schedule is set for total_steps, so make the two equal."
        )
    allocator = RankAllocator(model, config)

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        task_loss = model(**batch).loss
        orthogonality = orthogonality_loss(model)
        metrics = {"task_loss": task_loss.item(), "orthogonality": orthogonality.item()}
        return task_loss + config.orth_reg_weight * orthogonality, metrics

    return TrainingHooks(loss_fn=loss_fn, after_step=allocator.update_and_allocate, state=allocator)
