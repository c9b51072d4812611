"""peftlab's bottleneck adapters against AdapterHub's ``adapters`` 1.3.0: the same weights, the same logits.

``adapters`` 1.3.0 pins ``transformers~=4.57`` and does not import with transformers 5, so it runs in a venv of its
own, ``.venv-adapters``, and the comparison goes in two steps (``make reference-adapters`` runs both):

    .venv/bin/python tools/adapters_reference.py export           # peftlab (main venv): weights, inputs, logits
    .venv-adapters/bin/python tools/adapters_reference.py compare  # adapters 1.3.0: load them, compare the logits

``export`` builds MiniLM-L6 with a three-class head and, for each placement, peftlab's adapters of bottleneck
``m = 32`` (ReLU): Houlsby's two per block (``adapter.HOULSBY``) and Pfeiffer's one after the FFN's Add & Norm
(``adapter.PFEIFFER``). W_up = 0 would make any comparison pass, so every adapter tensor gets random values
N(0, 0.05²); the head too. It writes each model's state dict (the base, the head and the adapters) and the logits
of a tokenised batch, with the adapters and without them (``methods.disabled``), to
``test-artifacts/adapters_reference/`` (safetensors), with the encoder's folder.

``compare`` loads the encoder with ``BertForSequenceClassification``, adds AdapterHub's ``DoubleSeqBnConfig``
(Houlsby) or ``SeqBnConfig`` (Pfeiffer) with ``reduction_factor = d/m`` and ReLU, copies peftlab's tensors in
(``down.weight`` → ``adapter_down.0.weight``, ``up`` → ``adapter_up``; the attention adapter is AdapterHub's
``mh_adapter`` in ``attention.output.adapters``, the FFN's its
``output_adapter`` in ``output.adapters``), and writes the max |Δ logits| of each to
``benchmarks/results/adapters_reference.json`` with the versions of both sides.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "test-artifacts" / "adapters_reference"
RESULT = ROOT / "benchmarks" / "results" / "adapters_reference.json"
BOTTLENECK = 32
SENTENCES = ["Shares slump after the company cuts its profit forecast.",
             "Quarterly revenue beats estimates; the stock jumps.", "The board meets on Tuesday."]  # fmt: skip
#: Which AdapterHub module holds the adapter of each peftlab site (by the path's tail inside a block).
SITES = {"attention.output.dense": "attention.output", "output.dense": "output", "output.LayerNorm": "output"}
TOLERANCE = 1e-4


def export() -> None:
    """peftlab's side (main venv): two adapted MiniLMs with random adapter weights, their state and logits."""
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers
    from safetensors.torch import save_file

    import peftlab
    from peftlab import methods, models
    from peftlab.methods import adapter

    WORK.mkdir(parents=True, exist_ok=True)
    _, tokenizer = models.load_encoder()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    meta = {"encoder": models.resolve_model("encoder")[1], "bottleneck": BOTTLENECK, "placements": {},
            "peftlab": {"peftlab": peftlab.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__}}  # fmt: skip
    for label, placement in (("houlsby", adapter.HOULSBY), ("pfeiffer", adapter.PFEIFFER)):
        torch.manual_seed(0)
        model = models.load_encoder(num_labels=3)[0].eval()
        adapter.apply(model, adapter.AdapterConfig(bottleneck=BOTTLENECK, placement=placement))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".adapter." in name or name.startswith("classifier."):
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            logits = model(**batch).logits
            with methods.disabled(model):
                base_logits = model(**batch).logits
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, WORK / f"{label}_state.safetensors")
        save_file(
            {"logits": logits, "base_logits": base_logits, **{k: v.contiguous() for k, v in batch.items()}},
            WORK / f"{label}_io.safetensors",
        )
        meta["placements"][label] = list(placement)
    (WORK / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"exported to {WORK}")


def _reference_state(peftlab_state: dict, blocks: int) -> dict:
    """peftlab's tensor names → AdapterHub's: the base weights unwrapped, each adapter moved to its module."""
    renamed = {}
    for name, tensor in peftlab_state.items():
        if ".adapter.default." not in name:
            renamed[name.replace(".base_layer.", ".")] = tensor
            continue
        site, tail = name.split(".adapter.default.")
        prefix, index, path = _split_block(site, blocks)
        module = SITES[path]
        tail = tail.replace("down.", "adapter_down.0.").replace("up.", "adapter_up.")
        renamed[f"{prefix}{index}.{module}.adapters.reference.{tail}"] = tensor
    return renamed


def _split_block(site: str, blocks: int) -> tuple[str, int, str]:
    prefix = "bert.encoder.layer."
    index, path = site.removeprefix(prefix).split(".", 1)
    assert site.startswith(prefix) and int(index) < blocks, site
    return prefix, int(index), path


def compare() -> None:
    """AdapterHub's side (.venv-adapters): the same tensors in adapters' modules, the logits compared."""
    import adapters
    import torch
    import transformers
    from safetensors.torch import load_file

    meta = json.loads((WORK / "meta.json").read_text())
    rows = {}
    for label in meta["placements"]:
        model = transformers.BertForSequenceClassification.from_pretrained(meta["encoder"], num_labels=3).eval()
        adapters.init(model)
        d = model.config.hidden_size
        config_class = adapters.DoubleSeqBnConfig if label == "houlsby" else adapters.SeqBnConfig
        model.add_adapter("reference", config=config_class(reduction_factor=d // meta["bottleneck"],
                                                           non_linearity="relu"))  # fmt: skip
        model.set_active_adapters("reference")
        state = _reference_state(load_file(WORK / f"{label}_state.safetensors"), model.config.num_hidden_layers)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # adapters' prompt-tuning module holds a reference to the word embeddings, loaded under their own name
        missing = [
            name
            for name in missing
            if not name.endswith(("position_ids", "prompt_tuning.base_model_embeddings.weight"))
        ]
        if missing or unexpected:
            raise SystemExit(f"{label}: tensors that did not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
        io = load_file(WORK / f"{label}_io.safetensors")
        with torch.no_grad():
            logits = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"],
                           token_type_ids=io["token_type_ids"]).logits  # fmt: skip
        delta = (logits - io["logits"]).abs().max().item()
        rows[label] = {"adapterhub_config": config_class.__name__, "placement": meta["placements"][label],
                       "reduction_factor": d // meta["bottleneck"], "max_abs_logit_difference": delta,
                       "adapters_change_the_logits_by": (io["logits"] - io["base_logits"]).abs().max().item(),
                       "equal_within": TOLERANCE, "equal": delta <= TOLERANCE}  # fmt: skip
        print(
            f"{label:>9} ({config_class.__name__}): max |Δ logits| = {delta:.2e} (the adapters move the logits by "
            f"{rows[label]['adapters_change_the_logits_by']:.3f})"
        )
    result = {"what": "peftlab's adapters vs AdapterHub adapters 1.3.0 on MiniLM-L6, the same random adapter weights "
                      f"(m = {meta['bottleneck']}, ReLU), {len(SENTENCES)} sentences",
              "date": date.today().isoformat(), "device": f"CPU ({platform.machine()})",
              "peftlab_side": meta["peftlab"],
              "reference_side": {"adapters": adapters.__version__, "torch": torch.__version__,
                                 "transformers": transformers.__version__, "python": platform.python_version()},
              "rows": rows}  # fmt: skip
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)}")
    if not all(row["equal"] for row in rows.values()):
        raise SystemExit(f"The logits differ by more than {TOLERANCE}.")


if __name__ == "__main__":
    steps = {"export": export, "compare": compare}
    if len(sys.argv) != 2 or sys.argv[1] not in steps:
        raise SystemExit(f"usage: {Path(__file__).name} export|compare (see the docstring)")
    steps[sys.argv[1]]()
