"""Keep the notebooks clean in git, and run them.

    python tools/notebooks.py clean notebooks/*.ipynb   strip what git should not hold
    python tools/notebooks.py run   notebooks/*.ipynb   execute (profile from PEFTLAB_PROFILE), then clean
    python tools/notebooks.py check notebooks/*.ipynb   list what is not clean (exit 1 if anything)
    python tools/notebooks.py stamp notebooks/*.ipynb   write each Colab badge and Colab install from pyproject.toml

Clean means: no cell metadata but tags and ``peftlab`` (the prose check's stated figures, tools/prose.py),
notebook metadata reduced to the kernel and the language, and outputs only in cells marked ``# NBVAL_CHECK_OUTPUT``
(the cells nbval compares; their stderr is dropped, since it holds warnings that vary between machines). No
execution counts, with one exception that nbval forces: it compares a cell only when the stored cell has an
execution count, so a checked cell carries a fixed one, its position among the code cells (1, 2, ...).
Re-running a notebook therefore never changes its file unless its content changed.

Where the workbook is published is written in one place, ``[project.urls] Repository`` in pyproject.toml; the
release is ``v<version>``. ``stamp`` writes both into every notebook: the *Open in Colab* badge of the title cell
(this notebook, at that release) and the Colab-only lines of the setup cell (peftlab at that release, its tested
dependencies, the two base models, downloads of the public data sets on).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import nbformat

CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
#: The cell metadata git keeps: nbval's and JupyterLab's tags, and the figures a cell states (tools/prose.py).
KEPT_METADATA = ("tags", "peftlab")
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
CLEAN_METADATA = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
REPO = Path(__file__).resolve().parents[1]
BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
SETUP_END = "from peftlab import env"


def release() -> tuple[str, str]:
    """``(owner/name, tag)``: where the workbook is published on GitHub, and the release the notebooks install."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    repository = project["urls"]["Repository"].removeprefix("https://github.com/").strip("/")
    return repository, f"v{project['version']}"


def colab_badge(notebook_name: str) -> str:
    """The badge that opens this notebook on Colab, at the release the setup cell installs."""
    repository, tag = release()
    link = f"https://colab.research.google.com/github/{repository}/blob/{tag}/notebooks/{notebook_name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({link})"


def colab_setup() -> str:
    """The start of every setup cell, up to ``from peftlab import env``: what runs on Colab only."""
    repository, tag = release()
    return f"""import os
import sys

if "google.colab" in sys.modules:  # on Colab only: peftlab at its release, its tested dependencies, the base models
    !pip install -q --no-deps "peftlab @ git+https://github.com/{repository}@{tag}"
    !python -m peftlab.install colab
    os.environ["PEFTLAB_DOWNLOAD"] = "1"  # the full profile (auto on Colab's GPU) downloads the public data sets

"""


def setup_cell(notebook):
    """The first code cell: it installs on Colab, then calls ``env.setup``."""
    return next(cell for cell in notebook.cells if cell.cell_type == "code")


def stamp(notebook, notebook_name: str):
    """Write the Colab badge and the Colab lines of the setup cell from pyproject.toml (see the module docstring)."""
    title = notebook.cells[0]
    if not BADGE.search(title.source):
        raise ValueError(f"{notebook_name}: the title cell has no Open in Colab badge to stamp")
    title.source = BADGE.sub(lambda _: colab_badge(notebook_name), title.source, count=1)
    setup = setup_cell(notebook)
    if SETUP_END not in setup.source:
        raise ValueError(f"{notebook_name}: the first code cell has no line {SETUP_END!r}")
    setup.source = colab_setup() + setup.source[setup.source.index(SETUP_END) :]
    return notebook


def is_checked(cell) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith(CHECK_MARK)


def fixed_counts(notebook) -> dict[int, int | None]:
    """The execution count each cell should carry: its position among code cells if checked, else none."""
    code_cells = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    return {index: position if is_checked(notebook.cells[index]) else None
            for position, index in enumerate(code_cells, start=1)}  # fmt: skip


def clean(notebook):
    """The notebook as git should hold it (see the module docstring)."""
    notebook.metadata = nbformat.from_dict(CLEAN_METADATA)
    counts = fixed_counts(notebook)
    for index, cell in enumerate(notebook.cells):
        cell.metadata = nbformat.from_dict({key: cell.metadata[key] for key in KEPT_METADATA if cell.metadata.get(key)})
        if cell.cell_type != "code":
            continue
        cell.execution_count = counts[index]
        if not is_checked(cell):
            cell.outputs = []
            continue
        kept = []
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                continue
            if "execution_count" in output:
                output.execution_count = counts[index]
            if "metadata" in output:
                output.metadata = nbformat.from_dict({})
            kept.append(output)
        cell.outputs = kept
    return notebook


def problems(notebook) -> list[str]:
    """What keeps a notebook from being clean, one line each (empty when clean)."""
    found = []
    if dict(notebook.metadata) != CLEAN_METADATA:
        found.append(f"notebook metadata {sorted(notebook.metadata)} is not just kernelspec and language_info")
    counts = fixed_counts(notebook)
    for index, cell in enumerate(notebook.cells):
        where = f"cell {index}"
        if set(cell.metadata) - set(KEPT_METADATA):
            found.append(f"{where}: metadata {sorted(set(cell.metadata) - set(KEPT_METADATA))}")
        if cell.cell_type != "code":
            continue
        if cell.execution_count != counts[index]:
            found.append(f"{where}: execution count {cell.execution_count}, expected {counts[index]}")
        if cell.outputs and not is_checked(cell):
            found.append(f"{where}: outputs kept in a cell nbval does not check")
        for output in cell.outputs:
            if output.get("execution_count") not in (None, counts[index]):
                found.append(f"{where}: execution count {output.get('execution_count')} in an output")
            if output.get("metadata"):
                found.append(f"{where}: output metadata")
    return found


def run(path: Path) -> None:
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()  # fmt: skip
    nbformat.write(clean(notebook), path)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("clean", "run", "check", "stamp"):
        print(__doc__, file=sys.stderr)
        return 2
    command, paths = argv[0], [Path(p) for p in argv[1:]]
    status = 0
    for path in paths:
        if command == "run":
            print(f"running {path}", flush=True)
            run(path)
        elif command == "clean":
            nbformat.write(clean(nbformat.read(path, as_version=4)), path)
        elif command == "stamp":
            name = path.resolve().relative_to(REPO / "notebooks").as_posix()  # solutions/01_solutions.ipynb
            nbformat.write(clean(stamp(nbformat.read(path, as_version=4), name)), path)
        else:
            for problem in problems(nbformat.read(path, as_version=4)):
                print(f"{path}: {problem}")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
