"""The prose check: every figure in a notebook's markdown is backed by a record it cites, or stated with a source."""

import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import prose  # noqa: E402

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted(
    (REPO / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb")
)


def texts(markdown: str) -> list[str]:
    return [figure.text for figure in prose.figures(markdown)]


def test_figures_are_the_measured_numbers_and_nothing_else():
    markdown = (
        "Full fine-tuning reaches 0.871 on 9,543 tweets with 3.4 M trainable weights, +35.6 % more memory, 1.9x "
        "the speed and 6.5 ms per step on a 16 GB T4."
    )
    assert texts(markdown) == ["0.871", "9,543", "3.4 M", "+35.6 %", "1.9x", "6.5 ms", "16 GB"]


def test_names_versions_years_maths_code_rates_and_small_counts_are_not_figures():
    markdown = (
        "Llama-3.2-1B and SmolLM2-135M, r = 8 over 3 seeds and 12 layers, transformers 5.24 and peft 0.21.2 "
        "(Hu et al., 2021), `0.5 GiB` in code, $2.5\\Psi$ in maths, a rate of 2e-4 or 2·10⁻⁴, cell 01[28], "
        "[the record](results/08_full.json)."
    )
    assert texts(markdown) == []


def test_a_figure_is_backed_by_a_value_in_its_units_or_by_a_difference_or_ratio_of_two():
    groups = {"accuracy": np.array([0.8706, 0.8558]), "trainable": np.array([3_400_000.0]),
              "seconds": np.array([0.0214, 1.5, 1.2]), "bytes": np.array([2.0 * 2**30])}  # fmt: skip

    def backed(markdown: str) -> bool:
        (figure,) = prose.figures(markdown)
        return prose.is_backed(figure, groups)

    assert backed("0.871") and backed("87.1 %") and backed("3.4 M") and backed("21.4 ms") and backed("2.00 GiB")
    assert backed("1.5 points")  # 0.8706 - 0.8558, in points
    assert backed("+25.0 %") and backed("1.25x")  # 1.5 / 1.2
    assert not backed("0.872") and not backed("87.2 %") and not backed("3.5 M") and not backed("2.01 GiB")
    assert not backed("0.015")  # a plain number is never a gap
    two_kinds = {"accuracy": np.array([0.87]), "loss": np.array([0.85])}
    assert not prose.is_backed(prose.figures("2.0 points")[0], two_kinds)  # nor a gap between two kinds


def write_notebook(tmp_path: Path, markdown: str, metadata: dict | None = None) -> Path:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "99_full.json").write_text(json.dumps({"rows": [{"accuracy": 0.8706}]}))
    cell = nbformat.v4.new_markdown_cell(markdown, metadata=metadata or {})
    path = tmp_path / "99_check.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    return path


def test_a_figure_no_cited_record_holds_fails_and_says_what_to_do(tmp_path):
    path = write_notebook(tmp_path, "From `results/99_full.json`: 0.871, but also 0.905.")
    (problem,) = prose.unbacked(path)
    assert "'0.905'" in problem and "results/99_full.json" in problem and "peftlab.stated" in problem


def test_a_figure_without_the_record_cited_is_not_backed(tmp_path):
    assert prose.unbacked(write_notebook(tmp_path, "Full fine-tuning reaches 0.871."))


def test_a_stated_figure_needs_its_source(tmp_path):
    stated = {"peftlab": {"stated": {"16 GB": "the free Colab T4 (NVIDIA's data sheet)"}}}
    assert prose.unbacked(write_notebook(tmp_path, "A T4 holds 16 GB.", stated)) == []
    (tmp_path / "results" / "99_full.json").unlink()
    (tmp_path / "results").rmdir()
    unsourced = {"peftlab": {"stated": {"16 GB": " "}}}
    assert any("names no source" in p for p in prose.unbacked(write_notebook(tmp_path, "A T4: 16 GB.", unsourced)))


def test_a_cited_record_that_does_not_exist_is_an_error(tmp_path):
    path = write_notebook(tmp_path, "See `results/98_full.json`.")
    with pytest.raises(FileNotFoundError, match=r"98_full\.json"):
        prose.unbacked(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_figure_in_the_prose_is_backed(path):
    assert prose.unbacked(path) == []


def test_digits_of_checksums_addresses_and_versions_back_nothing(tmp_path):
    record = {"md5": "0871abc", "url": "https://example.org/v0871/file", "versions": {"torch": "2.13.0"},
              "note": "measured 1,115,394 characters at 0.5 s"}  # fmt: skip
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    numbers = np.concatenate(list(prose.record_numbers(path).values()))
    assert sorted(numbers.tolist()) == [0.5, 1_115_394.0]
