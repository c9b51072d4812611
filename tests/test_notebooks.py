"""The notebooks as files: clean in git, on the template, listed in the README. (nbval runs them.)"""

import json
import os
import re
import sys
import types
from pathlib import Path

import nbformat
import pytest
import torch
from IPython.core.inputtransformer2 import TransformerManager

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import notebooks as notebook_tools  # noqa: E402

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((REPO / "notebooks" / "solutions").glob("*.ipynb"))
EVERY_NOTEBOOK = NOTEBOOKS + SOLUTIONS
EXERCISE = re.compile(r"^### Exercise (\d+): (.+)$", re.M)
SOLUTION = re.compile(r"^### Solution (\d+): (.+)$", re.M)


def headings(path: Path, pattern: re.Pattern) -> list[tuple[str, str]]:
    notebook = nbformat.read(path, as_version=4)
    markdown = [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]
    return [match.groups() for source in markdown for match in pattern.finditer(source)]


def solutions_of(chapter: Path) -> Path:
    """Where a chapter's worked solutions live: notebooks/solutions/NN_solutions.ipynb."""
    return chapter.parent / "solutions" / f"{chapter.name[:2]}_solutions.ipynb"


def test_there_are_notebooks_and_they_are_numbered():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), path.name


@pytest.mark.parametrize("path", EVERY_NOTEBOOK, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    assert notebook_tools.problems(nbformat.read(path, as_version=4)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_template(path):
    notebook = nbformat.read(path, as_version=4)
    title = notebook.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith(f"# {path.name[:2]} · ")
    assert "What you will learn" in title.source and "| smoke |" in title.source
    setup = notebook_tools.setup_cell(notebook)
    assert "env.setup(" in setup.source
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert "## Summary" in text and "Exercises" in text


@pytest.mark.parametrize("path", EVERY_NOTEBOOK, ids=lambda p: p.name)
def test_the_colab_badge_and_install_are_stamped_from_the_one_address(path):
    """The badge opens this very notebook at the release the setup cell installs, both from pyproject.toml."""
    notebook = nbformat.read(path, as_version=4)
    repository, tag = notebook_tools.release()
    name = path.relative_to(REPO / "notebooks").as_posix()
    assert notebook_tools.colab_badge(name) in notebook.cells[0].source, "run: python tools/notebooks.py stamp"
    assert f"github/{repository}/blob/{tag}/notebooks/{name}" in notebook.cells[0].source
    assert notebook_tools.setup_cell(notebook).source.startswith(notebook_tools.colab_setup())


class RecordingShell:
    """Stands in for IPython on Colab: records each ``!command`` instead of running it."""

    def __init__(self):
        self.commands: list[str] = []

    def system(self, command: str) -> None:
        self.commands.append(command)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_on_colab_the_first_cell_installs_the_release_and_turns_downloads_on(path, monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # Colab's GPU: the auto profile picks full
    monkeypatch.setenv("PEFTLAB_DEVICE", "cpu")  # ... while the cell really runs here, on the CPU
    monkeypatch.setenv("PEFTLAB_DOWNLOAD", "0")  # restored after the test
    monkeypatch.delenv("PEFTLAB_PROFILE", raising=False)
    shell = RecordingShell()
    source = notebook_tools.setup_cell(nbformat.read(path, as_version=4)).source
    namespace = {"get_ipython": lambda: shell}
    exec(TransformerManager().transform_cell(source), namespace)
    repository, tag = notebook_tools.release()
    assert shell.commands == [
        f'pip install -q --no-deps "peftlab @ git+https://github.com/{repository}@{tag}"',
        "python -m peftlab.install colab",
    ]
    assert os.environ["PEFTLAB_DOWNLOAD"] == "1" and namespace["run"].profile == "full"


def test_off_colab_the_first_cell_installs_nothing(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    shell = RecordingShell()
    source = notebook_tools.setup_cell(nbformat.read(NOTEBOOKS[0], as_version=4)).source
    exec(TransformerManager().transform_cell(source), {"get_ipython": lambda: shell})
    assert shell.commands == []


@pytest.mark.parametrize("chapter", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_its_solution_kept_apart(chapter):
    """Exercises are `### Exercise N: title` in the chapter; notebooks/solutions/NN_solutions.ipynb answers each
    under `### Solution N: title`, the same titles in the same order (nbval runs the solutions too)."""
    exercises = headings(chapter, EXERCISE)
    assert exercises, f"{chapter.name} has no `### Exercise N: title` headings"
    assert [n for n, _ in exercises] == [str(i) for i in range(1, len(exercises) + 1)]
    solutions = solutions_of(chapter)
    assert solutions.is_file(), f"{chapter.name}'s exercises have no solutions: write {solutions.relative_to(REPO)}"
    assert headings(solutions, SOLUTION) == exercises
    title = nbformat.read(solutions, as_version=4).cells[0].source
    assert title.startswith(f"# {chapter.name[:2]} · Solutions") and chapter.name in title


def test_solutions_belong_to_a_chapter():
    chapters = {solutions_of(chapter) for chapter in NOTEBOOKS}
    assert all(path in chapters for path in SOLUTIONS), "a solutions notebook whose chapter does not exist"


def test_readme_indexes_every_notebook():
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"notebooks/{path.name}" in readme, f"{path.name} is missing from the README's index"


def test_the_cleanliness_check_catches_noise():
    checked = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1)")
    checked.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    unchecked = nbformat.v4.new_code_cell("x = 1", execution_count=3, metadata={"scrolled": True})
    notebook = nbformat.v4.new_notebook(cells=[unchecked, checked])
    notebook.metadata["widgets"] = {"state": {}}
    found = notebook_tools.problems(notebook)
    assert any("notebook metadata" in p for p in found) and any("['scrolled']" in p for p in found)
    assert any("cell 0: execution count 3, expected None" in p for p in found)
    assert any("cell 1: execution count None, expected 2" in p for p in found)
    assert notebook_tools.problems(notebook_tools.clean(notebook)) == []


def quoted_figures(record: dict) -> list[str]:
    """What a full run's prose must quote from its record: each accuracy, each validation loss, each measured peak."""
    rows = record.get("results", []) + record.get("freeze_sweep", []) + record.get("length_sweep", [])
    rows += list(record.get("baselines", {}).values())  # a notebook's own runs of LoRA and full fine-tuning
    if isinstance(record.get("minilm"), list):  # notebook 10: one row per MiniLM run
        rows += record["minilm"]
    rows += [row for row in record.get("summary", []) if "accuracy" in row]  # a sweep over seeds: its mean accuracies
    figures = [f"{row['accuracy']:.3f}" for row in rows]
    figures += [f"{row['mean']:.3f}" for row in record.get("tfew", {}).get("summary", [])]  # a loss ablation's means
    if isinstance(record.get("runs"), dict):  # a sweep with seeds, e.g. notebook 12's β: the mean held-out accuracy
        figures += [f"{run['mean']['reward_accuracy']:.3f}" for run in record["runs"].values()]
    figures += [f"{run['val_loss']:.3f}" for run in record.get("instruction_sweep", {}).get("runs", [])]
    figures += [f"{row['measured peak GiB']:.2f}" for row in record.get("peaks") or []]
    figures += [f"{size['val_loss_mean']:.3f}" for size in record.get("sizes", {}).values()]  # a data-size sweep
    return figures


@pytest.mark.parametrize(
    "record", sorted((REPO / "notebooks" / "results").glob("[0-9][0-9]_*.json")), ids=lambda p: p.name
)
def test_full_run_numbers_in_the_prose_come_from_its_record(record):
    """A full run writes notebooks/results/NN_full.json; the notebook's prose must quote what it measured."""
    notebook = nbformat.read(next((REPO / "notebooks").glob(f"{record.name[:2]}_*.ipynb")), as_version=4)
    prose = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    measured = json.loads(record.read_text())
    assert measured["profile"] == "full"
    gpu = measured["device"].removeprefix("NVIDIA ").split()[0]  # "NVIDIA H100 80GB HBM3" -> "H100"
    assert gpu in prose, f"the prose does not name the device the numbers were measured on ({gpu})"
    figures = quoted_figures(measured)
    assert figures, f"{record.name} holds nothing that the prose could quote"
    for figure in figures:  # a whole number in the prose: "5.31" is not found inside "15.31" or "5.312"
        assert re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d)", prose), f"{figure} ({record.name}) is not quoted"
