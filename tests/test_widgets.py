"""The explorers without a browser: the pure functions give exact numbers, the plots have the right bars and lines,
and the widgets recompute their summary line on every change (or show a sentence when a combination fails)."""

import ipywidgets
import pytest
import torch

from peftlab import memory, models, widgets
from peftlab.methods import lora

GIB = 2**30
ALL_GPUS = ", ".join(memory.GPUS)


# ----------------------------------------------------------------------------------------------------------------
# method_config
# ----------------------------------------------------------------------------------------------------------------
def test_method_config_applies_the_knobs():
    llama, gpt2 = models.meta_model("smollm2-135m"), models.meta_model("gpt2")
    config = widgets.method_config("lora", llama, r=32, alpha=64, target_modules="all linear")
    assert (config.r, config.alpha, config.target_modules) == (32, 64, lora.ALL_LINEAR)
    assert widgets.method_config("lora", gpt2, target_modules="attention q,v").target_modules == ("c_attn",)
    assert widgets.method_config("qlora", llama).lora.target_modules == lora.ALL_LINEAR  # QLoRA's own default
    qv = widgets.method_config("qlora", llama, r=4, target_modules="attention q,v").lora
    assert (qv.r, qv.target_modules) == (4, ("q_proj", "v_proj"))
    assert widgets.method_config("adalora", llama, r=16).init_r == 16
    assert widgets.method_config("lora-drop", llama, threshold=0.5, r=2).lora.r == 2
    assert widgets.method_config("prefix", llama, num_virtual_tokens=7).num_virtual_tokens == 7
    assert widgets.method_config("adapter", llama, bottleneck=16).bottleneck == 16
    assert widgets.method_config("freeze", llama, trainable_layers=5).trainable_layers == 5
    assert widgets.method_config("lora", llama, r=None).r == 8  # None keeps the default


@pytest.mark.parametrize("method", widgets.METHOD_NAMES)
def test_every_registered_method_is_counted_and_estimated_by_name(method):
    """The registry is the one list: every method in it has knobs the explorers know, counts and estimates."""
    if method == "linear-probe":  # it needs a classifier's head; the parameter explorer counts the bare encoder
        assert "reads a BERT sequence classifier" in widgets.parameter_explorer("bert-base", method).error
        return
    architecture = "bert-base" if method in ("bitfit", "ptuning-v2") else "smollm2-135m"
    assert set(widgets.KNOBS[method]) <= {*widgets.KNOB_CONTROLS, "alpha"}
    report = widgets.parameter_report(architecture, method)
    assert 0 < report.trainable <= report.total
    precision = "nf4" if method == "qlora" else "bf16-mixed"
    estimate = widgets.vram_report(architecture, memory.Setup(method=method, precision=precision, seq_len=128))
    assert estimate.peak > 0
    if architecture != "bert-base":  # the estimator trains BERT as a classifier (with its head), the count is bare
        assert estimate.trainable_parameters == report.trainable


def test_method_config_refuses_an_unknown_knob_and_names_the_right_ones():
    model = models.meta_model("smollm2-135m")
    with pytest.raises(ValueError, match=r"bottleneck for 'lora': it takes the knobs r, alpha, target_modules"):
        widgets.method_config("lora", model, bottleneck=8)
    with pytest.raises(ValueError, match="'full': it takes no knobs"):
        widgets.method_config("full", model, r=8)
    with pytest.raises(ValueError, match="Unknown method"):
        widgets.method_config("dora", model)


# ----------------------------------------------------------------------------------------------------------------
# parameter_report and its plot
# ----------------------------------------------------------------------------------------------------------------
LLAMA_2_7B = 6_738_415_616


def test_lora_on_llama_2_7b_matches_the_formula():
    report = widgets.parameter_report("llama-2-7b", "lora", r=8)
    assert report.trainable == 32 * 2 * 8 * (4096 + 4096) == 4_194_304  # q and v: r (d_in + d_out) per layer
    assert report.total == LLAMA_2_7B + report.trainable
    assert report.percent == pytest.approx(100 * 4_194_304 / report.total)
    assert report.by_kind.loc["lora", "trainable"] == report.trainable
    assert report.by_kind["trainable"].sum() == report.trainable


def test_reports_do_not_leak_into_each_other():
    """Applying a method mutates a model: the cached meta model must stay the bare architecture."""
    widgets.parameter_report("llama-2-7b", "lora", r=64)
    full = widgets.parameter_report("llama-2-7b", "full")
    assert full.trainable == full.total == LLAMA_2_7B


def test_bitfit_on_bert_base_trains_the_biases_and_the_pooler():
    report = widgets.parameter_report("bert-base", "bitfit")
    d, f, layers = 768, 3072, 12
    per_layer = 4 * d + f + d + 2 * d  # q, k, v, attention output; intermediate; output; two LayerNorms
    pooler = d * d + d  # the head (pooler) trains in full: train_head=True
    assert report.trainable == layers * per_layer + d + pooler == 692_736  # + the embeddings' LayerNorm bias
    assert report.total == 109_482_240


def test_freeze_trains_the_top_blocks_and_the_head():
    report = widgets.parameter_report("llama-2-7b", "freeze", trainable_layers=2)
    d, f, vocab = 4096, 11008, 32000
    block = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; two RMSNorms
    assert report.trainable == 2 * block + vocab * d == 535_838_720  # + the (untied) LM head
    assert widgets.parameter_report("llama-2-7b", "freeze", trainable_layers=0).trainable == vocab * d


def test_virtual_tokens_of_prompt_tuning():
    assert widgets.parameter_report("smollm2-135m", "prompt", num_virtual_tokens=10).trainable == 10 * 576


def test_plot_parameters_draws_every_kind_on_a_log_scale():
    report = widgets.parameter_report("llama-2-7b", "lora", r=8)
    ax = widgets.plot_parameters(report)
    kinds = len(report.by_kind)
    assert [len(bars) for bars in ax.containers] == [kinds, kinds]  # all parameters, trainable over them
    assert [label.get_text() for label in ax.get_yticklabels()] == list(report.by_kind.index)
    assert ax.get_xscale() == "log"
    assert "4,194,304" in ax.get_title() and "llama-2-7b" in ax.get_title()
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["all", "trainable"]


# ----------------------------------------------------------------------------------------------------------------
# vram_report, plot_vram, fit_summary
# ----------------------------------------------------------------------------------------------------------------
def test_vram_report_is_the_estimate_of_the_configured_method():
    report = widgets.vram_report("llama-3-8b", memory.Setup(method="lora", batch_size=2, seq_len=256), r=16)
    config = lora.LoRAConfig(r=16, target_modules=("q_proj", "v_proj"))
    assert (
        report.breakdown
        == memory.estimate(
            "llama-3-8b", memory.Setup(method="lora", method_config=config, batch_size=2, seq_len=256)
        ).breakdown
    )
    assert report.trainable_parameters == 32 * 16 * (4096 + 4096 + 4096 + 1024)  # v: 8 KV heads × 128
    assert report.setup.batch_size == 2


def _estimate(forward_gib: float, step_gib: float) -> memory.MemoryEstimate:
    phases = {
        "forward and backward": {"weights": int(forward_gib * GIB)},
        "optimizer step": {"weights": 0, "gradients": int(step_gib * GIB)},
    }
    return memory.MemoryEstimate(
        breakdown={},
        phases=phases,
        activations_per_layer=[],
        saved_bytes=0,
        trainable_parameters=0,
        total_parameters=0,
        setup=memory.Setup(),
    )


def test_fit_summary_sentences():
    assert widgets.fit_summary(_estimate(9.9, 1)) == f"Peak 9.9 GiB (+0.75 GiB CUDA context): fits on {ALL_GPUS}"
    assert widgets.fit_summary(_estimate(3, 20)) == (
        "Peak 20.0 GiB (+0.75 GiB CUDA context): does not fit on T4 16 GB; fits on A100 40 GB, A100 80 GB, H100 80 GB"
    )
    assert (
        widgets.fit_summary(_estimate(100, 1)) == f"Peak 100.0 GiB (+0.75 GiB CUDA context): does not fit on {ALL_GPUS}"
    )


def test_fit_summary_of_a_small_and_a_huge_run():
    small = widgets.vram_report("llama-3-8b", memory.Setup(method="qlora", batch_size=1, precision="nf4-dq"))
    huge = widgets.vram_report("llama-3-8b", memory.Setup(method="full", batch_size=1, precision="fp32"))
    assert widgets.fit_summary(small).endswith(f": fits on {ALL_GPUS}")
    assert widgets.fit_summary(huge).endswith(f": does not fit on {ALL_GPUS}")


def test_plot_vram_stacks_the_terms_of_each_phase_under_the_relevant_gpus():
    estimate = widgets.vram_report(
        "llama-3-8b", memory.Setup(method="qlora", batch_size=1, precision="nf4-dq")
    )  # about 9 GiB
    ax = widgets.plot_vram(estimate)
    assert len(ax.patches) == sum(len(terms) for terms in estimate.phases.values()) == 8
    forward = estimate.phases["forward and backward"]
    assert sum(bar.get_height() for bar in ax.patches[:4]) == pytest.approx(sum(forward.values()) / GIB)
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["forward and backward", "optimizer step"]
    assert [line.get_label() for line in ax.get_lines()] == ["T4 16 GB"]  # the next GPU above the peak, no more
    assert ax.get_lines()[0].get_ydata()[0] == pytest.approx((15_360 - 768) / 1024)
    assert [text.get_text() for text in ax.texts] == ["T4 16 GB"]
    assert ax.get_ylim()[1] > widgets.usable_gib("T4 16 GB") > estimate.peak / GIB
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [
        "weights",
        "optimizer states",
        "activations",
        "logits and loss",
        "gradients",
        "optimizer workspace",
    ]

    huge = widgets.plot_vram(widgets.vram_report("llama-3-8b", memory.Setup(method="full", precision="fp32")))
    assert [line.get_label() for line in huge.get_lines()] == list(memory.GPUS)
    assert huge.get_ylim()[1] > max(widgets.usable_gib(gpu) for gpu in memory.GPUS)


# ----------------------------------------------------------------------------------------------------------------
# The widgets
# ----------------------------------------------------------------------------------------------------------------
def test_parameter_explorer_recomputes_on_every_change():
    explorer = widgets.parameter_explorer(architecture="llama-2-7b", method="full")
    assert isinstance(explorer, ipywidgets.VBox) and isinstance(explorer.summary, ipywidgets.HTML)
    explorer.controls["architecture"].value = "smollm2-135m"
    explorer.controls["method"].value = "lora"
    qv = 576 + 576 + 576 + 192  # q: 576 → 576; v: 576 → 3 KV heads × 64
    explorer.controls["r"].value = 16
    assert 30 * 16 * qv == 921_600 == explorer.result.trainable
    assert "921,600" in explorer.summary.value
    explorer.controls["r"].value = 4
    assert "230,400" in explorer.summary.value
    assert len(explorer.figure.axes[0].containers) == 2  # the bar chart was redrawn
    explorer.controls["target_modules"].value = "all linear"
    assert explorer.result.config.target_modules == lora.ALL_LINEAR


def test_parameter_explorer_shows_only_the_knobs_of_the_method():
    explorer = widgets.parameter_explorer(method="lora")
    shown = {name for name, control in explorer.controls.items() if control.layout.display != "none"}
    assert shown == {"architecture", "method", "r", "target_modules"}
    explorer.controls["method"].value = "prefix"
    shown = {name for name, control in explorer.controls.items() if control.layout.display != "none"}
    assert shown == {"architecture", "method", "num_virtual_tokens"}


def test_explorers_refuse_an_unknown_knob():
    with pytest.raises(ValueError, match="Unknown knob"):
        widgets.parameter_explorer(rank=8)


def test_freeze_slider_follows_the_depth_of_the_architecture():
    explorer = widgets.parameter_explorer(architecture="llama-2-7b", method="freeze", trainable_layers=20)
    assert explorer.controls["trainable_layers"].max == 32
    explorer.controls["architecture"].value = "minilm-l6"
    assert explorer.controls["trainable_layers"].max == 6 and explorer.controls["trainable_layers"].value == 6
    assert explorer.error is None and explorer.result.architecture == "minilm-l6"


def test_fusion_explorer_shows_its_knobs_and_dropping_follows_the_depth():
    explorer = widgets.parameter_explorer(architecture="bert-base", method="adapter-fusion", dropped=11)
    shown = {name for name, control in explorer.controls.items() if control.layout.display != "none"}
    assert shown == {"architecture", "method", "num_adapters", "bottleneck", "dropped"}
    assert explorer.controls["dropped"].max == 11 and "1,771,776" in explorer.summary.value  # 3·768² + 3·768, once
    explorer.controls["architecture"].value = "minilm-l6"
    assert explorer.controls["dropped"].max == 5 and explorer.controls["dropped"].value == 5
    assert explorer.error is None and explorer.result.trainable == 3 * 384**2 + 3 * 384


def test_adapter_placement_knob_counts_pfeiffer_by_its_closed_form_and_refuses_it_on_a_pre_norm_model():
    """Pfeiffer's one adapter per block has L(2md + d + m) parameters (BERT-base: L = 12, d = 768, m = 64), half of
    Houlsby's two; both train the two LayerNorms of every adapted block (2 · 2d each). SmolLM2's pre-norm blocks have
    no norm after the FFN's residual add to put it behind."""
    assert widgets.method_config("adapter", models.meta_model("bert-base"), placement="Pfeiffer").placement == (
        "ffn_after_norm",
    )
    houlsby = widgets.parameter_report("bert-base", "adapter", bottleneck=64).trainable
    pfeiffer = widgets.parameter_report("bert-base", "adapter", bottleneck=64, placement="Pfeiffer").trainable
    blocks, d, m = 12, 768, 64
    norms = blocks * 2 * 2 * d
    assert (houlsby, pfeiffer) == (2 * blocks * (2 * m * d + d + m) + norms, blocks * (2 * m * d + d + m) + norms)
    explorer = widgets.parameter_explorer(architecture="smollm2-135m", method="adapter", placement="Pfeiffer")
    assert explorer.result is None and "pre-norm" in explorer.summary.value
    explorer.controls["placement"].value = "Houlsby"
    assert explorer.error is None and explorer.result.trainable > 0


def test_parameter_explorer_shows_a_failing_combination_as_a_sentence():
    explorer = widgets.parameter_explorer(architecture="llama-2-7b", method="bitfit")
    assert "has no bias parameters" in explorer.summary.value and explorer.result is None
    assert "Traceback" not in explorer.summary.value
    explorer.controls["architecture"].value = "bert-base"  # BERT has biases: the message goes
    assert explorer.error is None and "692,736" in explorer.summary.value
    explorer.controls["architecture"].value = "smollm2-135m"
    explorer.controls["method"].value = "lora"
    explorer.controls["r"].value = 256  # larger than v_proj's 192 outputs
    assert "rank at most 192" in explorer.summary.value


def test_vram_explorer_fit_sentence_follows_the_controls():
    explorer = widgets.vram_explorer("llama-3-8b", memory.Setup(method="full", batch_size=1, precision="fp32"))
    batch_1 = explorer.summary.value
    assert f"does not fit on {ALL_GPUS}" in batch_1
    explorer.controls["batch_size"].value = 64
    assert f"does not fit on {ALL_GPUS}" in explorer.summary.value and explorer.summary.value != batch_1
    assert explorer.result.setup.batch_size == 64
    explorer.controls["method"].value = "qlora"
    explorer.controls["precision"].value = "nf4-dq"
    explorer.controls["batch_size"].value = 1
    assert f"fits on {ALL_GPUS}" in explorer.summary.value and "does not fit" not in explorer.summary.value
    assert len(explorer.figure.axes[0].patches) == 8
    explorer.controls["grad_checkpointing"].value = True
    explorer.controls["attn_implementation"].value = "eager"
    explorer.controls["optimizer"].value = "sgd"
    explorer.controls["seq_len"].value = 1024
    assert explorer.result.setup.settings() == {
        "method": "qlora",
        "batch_size": 1,
        "seq_len": 1024,
        "precision": "nf4-dq",
        "optimizer": "sgd",
        "grad_checkpointing": True,
        "attn_implementation": "eager",
        "device": "cuda",
    }


def test_vram_explorer_shows_errors_as_sentences(monkeypatch):
    explorer = widgets.vram_explorer("llama-3-8b", memory.Setup(method="lora", precision="nf4"))
    assert explorer.error is None
    explorer.controls["method"].value = "full"
    assert "cannot be trained by 'full'" in explorer.summary.value and explorer.result is None

    def not_yet(*args, **kwargs):  # what memory.estimate says of a family it does not cover yet
        raise NotImplementedError("The activation model covers Llama-style decoders so far, not bert.")

    monkeypatch.setattr(memory, "estimate", not_yet)
    explorer.controls["architecture"].value = "bert-base"
    explorer.controls["method"].value = "lora"
    assert "covers Llama-style decoders so far, not bert." in explorer.summary.value
    assert "Traceback" not in explorer.summary.value

    def bug(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(memory, "estimate", bug)
    explorer.refresh()
    assert "Unexpected RuntimeError (please report it): boom" in explorer.summary.value


@pytest.fixture(scope="module")
def tiny_lm():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    vocabulary = {f"t{i}": i for i in range(models.tiny_model("llama").config.vocab_size)}
    words = Tokenizer(tokenizer_models.WordLevel(vocabulary, "t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "t5 t6 t7" -> [5, 6, 7]
    return models.tiny_model("llama", seed=0), PreTrainedTokenizerFast(tokenizer_object=words)


def test_the_next_token_table_is_the_sampler_s_distribution(tiny_lm):
    from peftlab import generation

    model, tokenizer = tiny_lm
    input_ids = torch.tensor([[5, 6, 7]])
    logits = model(input_ids=input_ids).logits[:, -1].detach()
    settings = generation.GenerationSettings(do_sample=True, temperature=0.5, top_k=5)
    table = widgets.next_token_table(tokenizer, logits, input_ids, settings, top=8)
    expected = generation.next_token_scores(logits, input_ids, 0, settings, []).softmax(dim=-1)[0]
    order = torch.argsort(logits[0], descending=True)[:8]
    assert table["p sampled"].tolist() == pytest.approx(expected[order].tolist())
    assert (table["p sampled"] > 0).sum() == 5 and table["p sampled"].sum() == pytest.approx(1.0)
    assert table["p model"].tolist() == pytest.approx(logits.softmax(dim=-1)[0, order].tolist())


def test_next_token_explorer_follows_its_sliders(tiny_lm):
    model, tokenizer = tiny_lm
    explorer = widgets.next_token_explorer(model, tokenizer, "t5 t6 t7", top=10)
    assert (explorer.result["p sampled"] > 0).sum() == 10 and explorer.error is None
    explorer.controls["top_k"].value = 1
    assert (explorer.result["p sampled"] > 0).sum() == 1 and explorer.result["p sampled"].iloc[0] == 1.0
    assert "1 of the 10" in explorer.summary.value
    explorer.controls["top_k"].value = 0
    explorer.controls["temperature"].value = 0.1
    sharp = explorer.result["p sampled"].iloc[0]
    explorer.controls["temperature"].value = 2.0
    assert explorer.result["p sampled"].iloc[0] < sharp and len(explorer.figure.axes[0].containers) == 2
