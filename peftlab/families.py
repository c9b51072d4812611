"""One description per model family: where the blocks are, what their projections and norms are called, where each
method goes by default, and how positions are numbered. Every method and the memory estimator read it from here.

A *family* is a module layout. transformers names the modules of Llama, Qwen2 and Mistral alike (they differ in
biases, sliding windows and sizes, not in names), so one description serves all three; GPT-2 (fused q, k, v in a
``Conv1D``) and BERT (an encoder, post-norm, learned positions) have their own. Adding a family is one entry in
:data:`FAMILIES` plus its tests.

The projections of a block are named by *role*, the same in every family: ``q``, ``k``, ``v`` (or ``qkv`` where
they are fused), ``o`` (attention output), ``gate`` and ``up`` (into the feed-forward network), ``down`` (out of
it). A role's path is relative to the block.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """The module layout of a family of transformers models (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]  # transformers' ``config.model_type`` values that share this layout
    blocks: str  # the ModuleList of transformer blocks, as a suffix of its full name
    projections: dict[str, str]  # role → path inside a block
    norm: str  # one normalisation layer inside a block (its parameters say whether norms train)
    norm_kind: str  # "rms" (Llama) or "layer" (GPT-2, BERT)
    lora_targets: tuple[str, ...]  # LoRA's default targets (Hu et al.: the query and value projections)
    ia3_targets: tuple[str, ...] | str  # (IA)³'s default targets: keys, values, the FFN's down projection
    ia3_feedforward: tuple[str, ...] | str  # the targets whose input (IA)³ scales
    positions: str  # "rotary" (computed, no limit but the config's) or "learned" (a table of max positions)
    is_encoder: bool = False

    def path(self, role: str) -> str:
        """The path of a projection inside a block, by role; a clear error for a role this family lacks."""
        if role not in self.projections:
            raise ValueError(
                f"{self.name} blocks have no {role!r} projection; their roles are {', '.join(self.projections)}."
            )
        return self.projections[role]


_BERT_FFN_DOWN = r".*\.layer\.\d+\.output\.dense"

LLAMA = Family(
    name="llama",
    model_types=("llama", "qwen2", "mistral"),
    blocks="layers",
    projections={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    norm="input_layernorm",
    norm_kind="rms",
    lora_targets=("q_proj", "v_proj"),
    ia3_targets=("k_proj", "v_proj", "down_proj"),
    ia3_feedforward=("down_proj",),
    positions="rotary",
)
GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    blocks="h",
    projections={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    norm="ln_1",
    norm_kind="layer",
    lora_targets=("c_attn",),
    ia3_targets=("c_attn", "mlp.c_proj"),
    ia3_feedforward=("mlp.c_proj",),
    positions="learned",
)
BERT = Family(
    name="bert",
    model_types=("bert",),
    blocks="encoder.layer",
    projections={
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "up": "intermediate.dense",
        "down": "output.dense",
    },
    norm="attention.output.LayerNorm",
    norm_kind="layer",
    lora_targets=("query", "value"),
    # ``output.dense`` alone would also match ``attention.output.dense``: a regular expression picks the FFN's
    ia3_targets=rf".*\.attention\.self\.(key|value)|{_BERT_FFN_DOWN}",
    ia3_feedforward=_BERT_FFN_DOWN,
    positions="learned",
    is_encoder=True,
)

FAMILIES = {family.name: family for family in (LLAMA, GPT2, BERT)}
#: ``config.model_type`` → its family.
BY_MODEL_TYPE = {model_type: family for family in FAMILIES.values() for model_type in family.model_types}


def family_of(model_or_config: nn.Module | PretrainedConfig, needed_by: str = "peftlab") -> Family:
    """The family of a transformers model (or config), from its ``model_type``; a clear error for any other."""
    is_config = isinstance(model_or_config, PretrainedConfig)
    config = model_or_config if is_config else getattr(model_or_config, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in BY_MODEL_TYPE:
        close = difflib.get_close_matches(str(model_type), list(BY_MODEL_TYPE), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{needed_by} knows the module layouts of {', '.join(sorted(BY_MODEL_TYPE))} models, not of "
            f"{type(model_or_config).__name__} (model_type {model_type!r}){hint}. A new family is one entry in "
            "peftlab.families.FAMILIES."
        )
    return BY_MODEL_TYPE[model_type]


def transformer_blocks(model: nn.Module, needed_by: str = "peftlab") -> tuple[str, nn.ModuleList]:
    """The full name and the ``ModuleList`` of a model's transformer blocks (under any task head or wrapper)."""
    suffix = family_of(model, needed_by).blocks
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith(f".{suffix}")):
            return name, module
    raise ValueError(f"No list of transformer blocks '...{suffix}' in {type(model).__name__}.")
