"""How long each notebook takes in the smoke profile, measured, recorded and written into each title cell.

    python tools/notebook_times.py measure    run every chapter and its solutions (smoke profile, one at a time,
                                              nothing else running), write notebooks/results/notebook_times.json
    python tools/notebook_times.py from-junit FILE
                                              the same record from a pytest junit file of the suite (nbval's
                                              cells of each notebook, summed: the kernel's start is left out)
    python tools/notebook_times.py stamp      write each chapter's `| smoke |` timing row from that record

The title cell of every chapter carries a table of the time it takes; the smoke row is the only one this machine
can measure, and it comes from the record (the prose check, tools/prose.py, holds it to the record it cites).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NOTEBOOKS = REPO / "notebooks"
RECORD = NOTEBOOKS / "results" / "notebook_times.json"
WHERE = "CPU, 2 cores (CI)"


def every_notebook() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) + sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))


def execute(path: Path) -> float:
    """Wall seconds to run the notebook top to bottom in a fresh kernel (the file is left as it is)."""
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()  # fmt: skip
    return time.perf_counter() - started


def measure() -> dict:
    if os.environ.get("PEFTLAB_PROFILE") != "smoke":
        raise SystemExit("Set PEFTLAB_PROFILE=smoke: the record holds the smoke profile's times.")
    rows = []
    for path in every_notebook():
        seconds = execute(path)
        rows.append({"notebook": path.relative_to(NOTEBOOKS).as_posix(), "seconds": round(seconds, 1)})
        print(f"{rows[-1]['notebook']}: {seconds:.0f} s", flush=True)
    return write_record("wall time of each notebook run top to bottom in a fresh kernel, one at a time", rows)


def write_record(what: str, rows: list[dict]) -> dict:
    """The record: what was timed, on which machine, with which versions, and one row per notebook."""
    from peftlab import env

    record = {"what": what, "profile": "smoke", "device": f"CPU, {os.cpu_count()} cores ({platform.machine()})",
              "date": date.today().isoformat(), "versions": env.package_versions(), "rows": rows}  # fmt: skip
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    return record


def from_junit(path: Path) -> dict:
    """The record from nbval's per-cell times in a junit file (``pytest --junitxml``), summed per notebook."""
    import xml.etree.ElementTree as ElementTree

    seconds: dict[str, float] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("classname", "")  # nbval: "notebooks.solutions.01_solutions.ipynb"
        if name.endswith(".ipynb"):
            notebook = name.removeprefix("notebooks.").removesuffix(".ipynb").replace(".", "/") + ".ipynb"
            seconds[notebook] = seconds.get(notebook, 0.0) + float(case.get("time", 0))
    if not seconds:
        raise SystemExit(f"{path} holds no notebook cells: run the suite with --junitxml=FILE first")
    rows = [{"notebook": name, "seconds": round(value, 1)} for name, value in sorted(seconds.items())]
    return write_record("time of each notebook's cells under nbval in one run of the whole suite (kernel start "
                        "left out)", rows)  # fmt: skip


def smoke_row(seconds: float) -> str:
    return f"| smoke | {WHERE} | {round(seconds)} s (`results/notebook_times.json`) |"


def stamp() -> None:
    seconds = {row["notebook"]: row["seconds"] for row in json.loads(RECORD.read_text())["rows"]}
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        lines = notebook.cells[0].source.splitlines()
        rows = [index for index, line in enumerate(lines) if line.startswith("| smoke |")]
        if len(rows) != 1 or path.name not in seconds:
            raise SystemExit(f"{path.name}: needs one `| smoke |` row in its title cell and a time in {RECORD.name}")
        lines[rows[0]] = smoke_row(seconds[path.name])
        notebook.cells[0].source = "\n".join(lines)
        nbformat.write(notebook, path)


def main(argv: list[str]) -> int:
    if argv == ["measure"]:
        measure()
        return 0
    if len(argv) == 2 and argv[0] == "from-junit":
        from_junit(Path(argv[1]))
        return 0
    if argv == ["stamp"]:
        stamp()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
