"""Keep the notebooks clean in git, and run them.

    python tools/notebooks.py clean notebooks/*.ipynb   strip what git should not hold
    python tools/notebooks.py run   notebooks/*.ipynb   execute (profile from PEFTLAB_PROFILE), then clean
    python tools/notebooks.py check notebooks/*.ipynb   list what is not clean (exit 1 if anything)

Clean means: no cell metadata but tags, notebook metadata reduced to the kernel and the language, and outputs
only in cells marked ``# NBVAL_CHECK_OUTPUT`` (the cells nbval compares; their stderr is dropped, since it holds
warnings that vary between machines). No execution counts, with one exception that nbval forces: it compares a
cell only when the stored cell has an execution count, so a checked cell carries a fixed one, its position among
the code cells (1, 2, ...). Re-running a notebook therefore never changes its file unless its content changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
CLEAN_METADATA = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}


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
        tags = cell.metadata.get("tags")
        cell.metadata = nbformat.from_dict({"tags": tags} if tags else {})
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
        if set(cell.metadata) - {"tags"}:
            found.append(f"{where}: metadata {sorted(set(cell.metadata) - {'tags'})}")
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
    if len(argv) < 2 or argv[0] not in ("clean", "run", "check"):
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
        else:
            for problem in problems(nbformat.read(path, as_version=4)):
                print(f"{path}: {problem}")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
