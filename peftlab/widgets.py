"""Interactive explorers for the workbook: how many parameters a method trains, and how much GPU memory it needs.

Every widget is a thin shell around pure functions, which the tests call directly (no browser):

* :func:`method_config` — a method's default config with a few *knobs* applied (rank, virtual tokens, ...);
* :func:`parameter_report` / :func:`plot_parameters` — trainable parameters of a method on a real architecture
  (built on the meta device, so a 8 B model costs no memory);
* :func:`vram_report` / :func:`plot_vram` / :func:`fit_summary` — :func:`peftlab.memory.estimate` for the same
  choices, drawn as the two phases of a training step against the memory of common GPUs;
* :func:`next_token_table` / :func:`plot_next_tokens` — a language model's next-token distribution before and
  after the decoding settings of :mod:`peftlab.generation`.

:func:`parameter_explorer`, :func:`vram_explorer` and :func:`next_token_explorer` put dropdowns and sliders over
them. A combination that
cannot work (BitFit on a model without biases, a rank larger than a layer, a family the estimator does not cover
yet) shows its message in the explorer's summary line instead of a traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import html
import traceback
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets
import pandas as pd
import torch
from torch import nn

from peftlab import generation, memory, models
from peftlab.families import family_of
from peftlab.methods import METHOD_NAMES, REGISTRY, adapter, apply_method, default_config
from peftlab.methods.targets import ALL_LINEAR
from peftlab.params import ParameterCount, count_parameters, summary_by_kind

#: The knobs each method takes (from the registry); the explorers show the sliders of the chosen method only.
KNOBS: dict[str, tuple[str, ...]] = {name: tuple(entry.knobs) for name, entry in REGISTRY.items()}
#: Readable choices of LoRA's ``target_modules``: the family's query and value projections, or every linear layer.
TARGET_CHOICES = ("attention q,v", "all linear")
#: The explorers' target dropdown also offers the method's own default (LoRA: q,v; QLoRA: all linear).
METHOD_DEFAULT = "method default"
RANKS = tuple(2**i for i in range(9))  # 1 … 256
BOTTLENECKS = tuple(2**i for i in range(2, 11))  # 4 … 1024
#: The adapters' placements by their papers' names (notebook 06): two per block, or one after the FFN's Add & Norm.
PLACEMENT_CHOICES = {"Houlsby": adapter.HOULSBY, "Pfeiffer": adapter.PFEIFFER}
BATCH_SIZES = tuple(2**i for i in range(7))  # 1 … 64
SEQ_LENS = tuple(2**i for i in range(7, 14))  # 128 … 8192
#: Errors that mean "this combination does not work", shown as a sentence; anything else is a bug.
EXPECTED_ERRORS = (ValueError, NotImplementedError, LookupError)
GIB = 2**30
#: The knobs' controls, laid out in rows (alpha is a knob of the pure functions, not a control).
KNOB_ROWS = [
    ["r", "target_modules", "threshold"],
    ["num_virtual_tokens", "bottleneck", "placement", "trainable_layers"],
    ["num_adapters", "dropped"],
]
KNOB_CONTROLS = [name for row in KNOB_ROWS for name in row]


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------
def _lora_targets(value, model: nn.Module):
    """``"attention q,v"`` → the family's default targets, ``"all linear"`` → ``"all-linear"``; else as given."""
    if value == "attention q,v":
        return family_of(model, needed_by="LoRA's targets").lora_targets
    if value == "all linear":
        return ALL_LINEAR
    return value


def method_config(method: str, model: nn.Module, **knobs):
    """The config of ``method`` for ``model`` (:func:`peftlab.methods.default_config`) with ``knobs`` applied.

    The knobs of each method are the registry's (``KNOBS``): the LoRA family ``r``, ``alpha``, ``target_modules``
    (``"attention q,v"``, ``"all linear"``, or what :class:`~peftlab.methods.lora.LoRAConfig` takes), LoRA-drop's
    ``threshold``; the soft prompts and prefixes ``num_virtual_tokens``; adapters ``bottleneck`` and ``placement``
    (``"Houlsby"``, ``"Pfeiffer"``, or what :class:`~peftlab.methods.adapter.AdapterConfig` takes); AdapterFusion
    ``num_adapters``, ``bottleneck`` and ``dropped`` (AdapterDrop's first blocks); Freeze ``trainable_layers``. A knob
    set to ``None`` keeps the default.
    """
    config = default_config(method, model)  # checks the method's name
    if knobs.get("target_modules") is not None:
        knobs = {**knobs, "target_modules": _lora_targets(knobs["target_modules"], model)}
    if isinstance(knobs.get("placement"), str) and knobs["placement"] in PLACEMENT_CHOICES:
        knobs = {**knobs, "placement": PLACEMENT_CHOICES[knobs["placement"]]}
    return REGISTRY[method].configure(config, **knobs)


@functools.cache
def _meta_model(architecture: str) -> nn.Module:
    """The architecture on the meta device, built once (apply a method to a deep copy: applying mutates)."""
    return models.meta_model(architecture)


@dataclass
class ParameterReport:
    """Trainable and total parameters of a method on an architecture, and the split by module kind."""

    trainable: int
    total: int
    percent: float
    by_kind: pd.DataFrame
    architecture: str = ""
    method: str = ""
    config: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.method} on {self.architecture}: {ParameterCount(self.trainable, self.total)}"


def parameter_report(architecture: str, method: str, **knobs) -> ParameterReport:
    """Apply ``method`` (with ``knobs``, see :func:`method_config`) to ``architecture`` on the meta device and count."""
    model = copy.deepcopy(_meta_model(architecture))
    config = method_config(method, model, **knobs)
    model = apply_method(model, method, config)
    counts = count_parameters(model)
    return ParameterReport(
        trainable=counts.trainable,
        total=counts.total,
        percent=counts.percent,
        by_kind=summary_by_kind(model),
        architecture=architecture,
        method=method,
        config=config,
    )


def plot_parameters(report: ParameterReport, ax=None):
    """A horizontal bar per module kind: all its parameters in grey, the trainable ones over them in colour (log
    scale); the title gives trainable / total / percent. Returns the axes."""
    import matplotlib.pyplot as plt

    by_kind = report.by_kind
    ax = ax or plt.subplots(figsize=(7, 0.4 * len(by_kind) + 1.2))[1]
    kinds = list(by_kind.index)
    ax.barh(kinds, by_kind["total"], color="0.8", label="all")
    ax.barh(kinds, by_kind["trainable"], color="C0", height=0.5, label="trainable")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set(xlabel="parameters (log scale)", title=str(report))
    ax.legend(loc="lower right")
    return ax


def vram_report(architecture: str, setup: memory.Setup, **knobs) -> memory.MemoryEstimate:
    """:func:`peftlab.memory.estimate` of ``setup`` on ``architecture``, the method's config with ``knobs`` applied
    (see :func:`method_config`; a config in ``setup`` itself is refused: give knobs)."""
    if setup.method_config is not None:
        raise ValueError("vram_report makes the config from the knobs: leave setup.method_config at None.")
    config = method_config(setup.method, _meta_model(architecture), **knobs)
    return memory.estimate(architecture, dataclasses.replace(setup, method_config=config))


def usable_gib(gpu: str, cuda_context: int = memory.CUDA_CONTEXT_BYTES) -> float:
    """What PyTorch can allocate on a GPU of ``memory.GPUS``: its memory less the CUDA context, in GiB."""
    return (memory.GPUS[gpu] - cuda_context) / GIB


def _gib(nbytes: float) -> str:
    value = nbytes / GIB
    return f"{value:.1f}" if value >= 0.95 else f"{value:.2g}"


def plot_vram(estimate: memory.MemoryEstimate, ax=None):
    """One stacked bar per phase of the step (its terms, in GiB), and a dashed line per GPU of ``memory.GPUS`` at
    its memory less the CUDA context. The y-axis reaches the first GPU line above the peak, so the lines that matter
    show; lines beyond it are left out. Returns the axes."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7.5, 4.5), layout="constrained")[1]
    colours = {term: f"C{i}" for i, term in enumerate(memory.TERMS)}
    handles = {}
    for x, terms in enumerate(estimate.phases.values()):
        bottom = 0.0
        for term in memory.TERMS:
            if term not in terms:
                continue
            height = terms[term] / GIB
            bars = ax.bar(x, height, bottom=bottom, width=0.6, color=colours[term], label=term.replace("_", " "))
            handles.setdefault(term, bars)
            bottom += height
    ax.set_xticks(range(len(estimate.phases)), list(estimate.phases))
    peak = estimate.peak / GIB
    lines = {gpu: usable_gib(gpu, estimate.cuda_context) for gpu in memory.GPUS}
    above = [value for value in lines.values() if value >= peak]
    top = 1.1 * max(peak, min(above) if above else 0.0)
    for i, (gpu, value) in enumerate(lines.items()):
        if value > top:
            continue
        ax.axhline(value, color="0.3", linestyle="--", linewidth=1, label=gpu, zorder=3)
        right = i % 2 == 0  # alternate sides: A100 80 GB and H100 80 GB are 0.4 GB apart
        ax.text(
            0.99 if right else 0.01,
            value,
            gpu,
            transform=ax.get_yaxis_transform(),
            ha="right" if right else "left",
            va="bottom",
            fontsize=8,
            color="0.2",
            zorder=4,
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
        )
    ax.set_ylim(0, top)
    ax.set(ylabel="GiB (CUDA context not included)", title=f"Peak {_gib(estimate.peak)} GiB ({estimate.peak_phase})")
    ax.legend(handles=list(handles.values()), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return ax


def fit_summary(estimate: memory.MemoryEstimate) -> str:
    """A sentence: the peak, the CUDA context beside it, and the GPUs of ``memory.GPUS`` it fits on."""
    head = f"Peak {_gib(estimate.peak)} GiB (+{_gib(estimate.cuda_context)} GiB CUDA context)"
    fits = [gpu for gpu in memory.GPUS if estimate.fits(gpu)]
    misses = [gpu for gpu in memory.GPUS if not estimate.fits(gpu)]
    if not misses:
        return f"{head}: fits on {', '.join(fits)}"
    if not fits:
        return f"{head}: does not fit on {', '.join(misses)}"
    return f"{head}: does not fit on {', '.join(misses)}; fits on {', '.join(fits)}"


# ----------------------------------------------------------------------------------------------------------------
# Widgets
# ----------------------------------------------------------------------------------------------------------------
_STYLE = {"description_width": "initial"}


def _knob_controls(architecture: str, knobs: dict) -> dict[str, widgets.Widget]:
    known = sorted(KNOB_CONTROLS)
    unknown = sorted(set(knobs) - set(known))
    if unknown:
        raise ValueError(f"Unknown knob(s) {', '.join(unknown)}; the explorers have {', '.join(known)}.")
    layers = models.architecture_config(architecture).num_hidden_layers
    return {
        "r": widgets.SelectionSlider(options=RANKS, value=knobs.get("r", 8), description="LoRA rank r", style=_STYLE),
        "target_modules": widgets.Dropdown(
            options=(METHOD_DEFAULT, *TARGET_CHOICES),
            value=knobs.get("target_modules", METHOD_DEFAULT),
            description="LoRA targets",
            style=_STYLE,
        ),
        "num_virtual_tokens": widgets.IntSlider(
            value=knobs.get("num_virtual_tokens", 20), min=1, max=128, description="virtual tokens", style=_STYLE
        ),
        "bottleneck": widgets.SelectionSlider(
            options=BOTTLENECKS, value=knobs.get("bottleneck", 64), description="adapter bottleneck", style=_STYLE
        ),
        "placement": widgets.Dropdown(
            options=tuple(PLACEMENT_CHOICES),
            value=knobs.get("placement", "Houlsby"),
            description="adapter placement",
            style=_STYLE,
        ),
        "trainable_layers": widgets.IntSlider(
            value=min(knobs.get("trainable_layers", 2), layers),
            min=0,
            max=layers,
            description="Freeze: trained blocks",
            style=_STYLE,
        ),
        "num_adapters": widgets.IntSlider(
            value=knobs.get("num_adapters", 3), min=2, max=8, description="fusion: adapters fused", style=_STYLE
        ),
        "dropped": widgets.IntSlider(
            value=min(knobs.get("dropped", 0), layers - 1),
            min=0,
            max=layers - 1,
            description="AdapterDrop: first blocks dropped",
            style=_STYLE,
        ),
        "threshold": widgets.FloatSlider(
            value=knobs.get("threshold", 0.9),
            min=0.05,
            max=1.0,
            step=0.05,
            description="LoRA-drop: kept share",
            style=_STYLE,
        ),
    }


class Explorer(widgets.VBox):
    """The explorers' shell: ``controls`` (by name), a ``summary`` line, an ``output`` area, and the last
    ``result`` (or ``error``, a sentence). Every change of a control recomputes (:meth:`refresh`)."""

    def __init__(self, controls: dict[str, widgets.Widget], rows: list[list[str]], compute, describe, draw):
        self.controls = controls
        self.summary = widgets.HTML()
        self.output = widgets.Output()
        self.result = None
        self.error: str | None = None
        self.figure = None
        self._compute, self._describe, self._draw = compute, describe, draw
        self._busy = False
        wrap = widgets.Layout(flex_flow="row wrap")  # a narrow window wraps a row instead of cutting its labels
        boxes = [widgets.HBox([controls[name] for name in row], layout=wrap) for row in rows]
        super().__init__([*boxes, self.summary, self.output])
        for control in controls.values():
            control.observe(self._changed, names="value")
        self._show_knobs()
        self.refresh()

    @property
    def values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    def knobs(self) -> dict[str, Any]:
        """The knobs of the chosen method, from their controls (``"method default"`` targets left out)."""
        chosen = {
            name: self.controls[name].value for name in KNOBS[self.controls["method"].value] if name in self.controls
        }
        if chosen.get("target_modules") == METHOD_DEFAULT:
            del chosen["target_modules"]
        return chosen

    def _show_knobs(self) -> None:
        if "method" not in self.controls:
            return
        wanted = KNOBS[self.controls["method"].value]
        for name in KNOB_CONTROLS:
            if name in self.controls:
                self.controls[name].layout.display = None if name in wanted else "none"

    def _changed(self, change) -> None:
        if self._busy:
            return
        self._busy = True  # the updates below change other controls: recompute once, at the end
        try:
            if change["owner"] is self.controls.get("architecture"):
                slider = self.controls["trainable_layers"]
                layers = models.architecture_config(change["new"]).num_hidden_layers
                slider.value = min(slider.value, layers)
                slider.max = layers
                dropped = self.controls["dropped"]
                dropped.value = min(dropped.value, layers - 1)
                dropped.max = layers - 1
            if change["owner"] is self.controls.get("method"):
                self._show_knobs()
        finally:
            self._busy = False
        self.refresh()

    def refresh(self) -> None:
        """Recompute from the controls: the summary line, and the plot in the output area (cleared on an error)."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.output.clear_output(wait=True)
        try:
            self.result, self.error = self._compute(self), None
        except EXPECTED_ERRORS as error:
            self.result, self.error = None, str(error)
        except Exception as error:  # a bug: say so in the summary, keep the traceback in the output for a report
            self.result, self.error = None, f"Unexpected {type(error).__name__} (please report it): {error}"
            with self.output:
                traceback.print_exc()
        if self.error is not None:
            self.figure = None
            self.summary.value = f'<span style="color:#b00020">⚠ {html.escape(self.error, quote=False)}</span>'
            return
        self.summary.value = self._describe(self)
        with self.output:
            self.figure = plt.figure(figsize=(7.5, 4.5), layout="constrained")
            self._draw(self, self.figure.add_subplot())
            display(self.figure)
            plt.close(self.figure)


def _parameter_summary(explorer: Explorer) -> str:
    report = explorer.result
    return (
        f"<b>{html.escape(report.method)}</b> on <b>{html.escape(report.architecture)}</b>: trainable "
        f"<b>{report.trainable:,}</b> of {report.total:,} parameters ({report.percent:.4g} %)"
    )


def parameter_explorer(architecture: str = "smollm2-135m", method: str = "lora", **knobs) -> Explorer:
    """Dropdowns for the architecture and the method, sliders for the method's knobs; shows the trainable count
    and a bar chart by module kind (:func:`parameter_report`, :func:`plot_parameters`)."""
    controls = {
        "architecture": widgets.Dropdown(
            options=list(models.ARCHITECTURES), value=architecture, description="architecture", style=_STYLE
        ),
        "method": widgets.Dropdown(options=METHOD_NAMES, value=method, description="method", style=_STYLE),
        **_knob_controls(architecture, knobs),
    }
    rows = [["architecture", "method"], *KNOB_ROWS]

    def compute(explorer: Explorer) -> ParameterReport:
        c = explorer.controls
        return parameter_report(c["architecture"].value, c["method"].value, **explorer.knobs())

    return Explorer(controls, rows, compute, _parameter_summary, lambda e, ax: plot_parameters(e.result, ax=ax))


def _vram_summary(explorer: Explorer) -> str:
    estimate = explorer.result
    c = explorer.controls
    counts = ParameterCount(estimate.trainable_parameters, estimate.total_parameters)
    return (
        f"<b>{html.escape(fit_summary(estimate), quote=False)}</b><br>"
        f'<span style="color:#555">{html.escape(c["method"].value)} on {html.escape(c["architecture"].value)}: '
        f"{counts}</span>"
    )


#: The explorer's default training setup: LoRA at batch 4 × 512 tokens, bf16-mixed, AdamW.
DEFAULT_SETUP = memory.Setup(method="lora", batch_size=4)


def vram_explorer(architecture: str = "llama-3-8b", setup: memory.Setup = DEFAULT_SETUP, **knobs) -> Explorer:
    """The controls of :func:`parameter_explorer` plus one per field of ``setup`` (batch size, sequence length,
    precision, optimizer, activation checkpointing, attention kernel), starting from ``setup``; shows
    :func:`fit_summary` and :func:`plot_vram`."""
    controls = {
        "architecture": widgets.Dropdown(
            options=list(models.ARCHITECTURES), value=architecture, description="architecture", style=_STYLE
        ),
        "method": widgets.Dropdown(options=METHOD_NAMES, value=setup.method, description="method", style=_STYLE),
        **_knob_controls(architecture, knobs),
        "batch_size": widgets.SelectionSlider(
            options=BATCH_SIZES, value=setup.batch_size, description="batch", style=_STYLE
        ),
        "seq_len": widgets.SelectionSlider(
            options=SEQ_LENS, value=setup.seq_len, description="sequence length", style=_STYLE
        ),
        "precision": widgets.Dropdown(
            options=memory.PRECISIONS, value=setup.precision, description="precision", style=_STYLE
        ),
        "optimizer": widgets.Dropdown(
            options=memory.OPTIMIZERS, value=setup.optimizer, description="optimizer", style=_STYLE
        ),
        "attn_implementation": widgets.Dropdown(
            options=memory.ATTENTION, value=setup.attn_implementation, description="attention", style=_STYLE
        ),
        "grad_checkpointing": widgets.Checkbox(
            value=setup.grad_checkpointing, description="activation checkpointing", style=_STYLE
        ),
    }
    settings = [name for name in setup.settings() if name in controls and name != "method"]
    rows = [["architecture", "method"], *KNOB_ROWS, settings[:2], settings[2:]]

    def compute(explorer: Explorer) -> memory.MemoryEstimate:
        c = explorer.controls
        chosen = {name: c[name].value for name in settings}
        return vram_report(
            c["architecture"].value, memory.Setup(method=c["method"].value, **chosen), **explorer.knobs()
        )

    return Explorer(controls, rows, compute, _vram_summary, lambda e, ax: plot_vram(e.result, ax=ax))


# ----------------------------------------------------------------------------------------------------------------
# The next-token distribution under the decoding settings
# ----------------------------------------------------------------------------------------------------------------
def next_token_table(tokenizer, logits: torch.Tensor, input_ids: torch.Tensor, settings: generation.GenerationSettings,
                     top: int = 12) -> pd.DataFrame:  # fmt: skip
    """The ``top`` likeliest next tokens: p under the model as it is, and p after ``settings`` (what sampling
    draws from: :func:`peftlab.generation.next_token_scores`, then softmax). Logits of one position, shape 1 × V."""
    before = logits.float().softmax(dim=-1)[0]
    after = generation.next_token_scores(logits, input_ids, 0, settings, []).softmax(dim=-1)[0]
    order = torch.argsort(before, descending=True)[:top].tolist()
    return pd.DataFrame({"token": [repr(tokenizer.decode([i])) for i in order], "p model": before[order].tolist(),
                         "p sampled": after[order].tolist()})  # fmt: skip


def plot_next_tokens(table: pd.DataFrame, ax=None):
    """Two bars per token: its probability under the model, and after the settings."""
    import matplotlib.pyplot as plt

    ax = ax or plt.figure(figsize=(7.5, 4.5), layout="constrained").add_subplot()
    rows = range(len(table))
    ax.barh([r + 0.2 for r in rows], table["p model"], height=0.4, label="model", color="#9e9e9e")
    ax.barh([r - 0.2 for r in rows], table["p sampled"], height=0.4, label="after the settings", color="#1f77b4")
    ax.set_yticks(list(rows), table["token"])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the next token")
    ax.legend(loc="lower right")
    return ax


def next_token_explorer(model, tokenizer, prompt: str, top: int = 12) -> Explorer:
    """Sliders for temperature, top-k, top-p and the repetition penalty over the next-token distribution of
    ``prompt`` (one forward pass; every change re-applies the settings only)."""
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, -1]
    controls = {
        "temperature": widgets.FloatSlider(
            value=1.0, min=0.1, max=2.0, step=0.05, description="temperature", style=_STYLE
        ),
        "top_k": widgets.IntSlider(value=0, min=0, max=50, description="top-k (0 = off)", style=_STYLE),
        "top_p": widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p", style=_STYLE),
        "repetition_penalty": widgets.FloatSlider(
            value=1.0, min=1.0, max=2.0, step=0.05, description="repetition penalty", style=_STYLE
        ),
    }

    def compute(explorer: Explorer) -> pd.DataFrame:
        settings = generation.GenerationSettings(do_sample=True, **explorer.values)
        return next_token_table(tokenizer, logits, input_ids, settings, top)

    def describe(explorer: Explorer) -> str:
        table = explorer.result
        kept = int((table["p sampled"] > 0).sum())
        return (f"After <b>{html.escape(prompt[-60:], quote=False)}</b>: {kept} of the {len(table)} likeliest tokens "
                f"can be drawn; the first has p = {table['p sampled'].iloc[0]:.2f} (the model: "
                f"{table['p model'].iloc[0]:.2f})")  # fmt: skip

    rows = [["temperature", "top_k"], ["top_p", "repetition_penalty"]]
    return Explorer(controls, rows, compute, describe, lambda e, ax: plot_next_tokens(e.result, ax=ax))
