"""What a full run measured, kept: ``notebooks/results/NN_full.json``, the record that a notebook's prose quotes.

Every number in a notebook's prose comes from the record of a full run (``PEFTLAB_PROFILE=full``, on a GPU), and
``tests/test_notebooks.py`` holds the prose to it. A record is one JSON object: the header that says where and how
the numbers were measured, then whatever the notebook measured::

    {"date": "2025-06-01", "device": "NVIDIA H100 80GB HBM3", "profile": "full",
     "versions": {"python": ..., "torch": ..., ...}, "seeds": [0],
     "data": "fin_tweets", "steps": 900, "results": [{"method": ..., "accuracy": ..., ...}, ...], ...}

The prose check reads ``device`` (the GPU it names), ``profile`` (always ``full``) and the figures it must find
quoted: ``results[*].accuracy``, ``freeze_sweep[*].accuracy``, ``instruction_sweep.runs[*].val_loss`` and
``peaks[*]["measured peak GiB"]``. A smoke run's numbers say only that the code runs, so :func:`write_full_run`
refuses them; a notebook calls it under ``if run.is_full:``. It never replaces a record without saying so.
"""

from __future__ import annotations

import json
import math
import re
from datetime import date
from pathlib import Path
from typing import Any

from peftlab import env

#: Where a notebook keeps its records: ``results/`` beside it (a notebook runs in its own folder).
RESULTS = Path("results")
#: The header every record starts with.
HEADER = ("date", "device", "profile", "versions", "seeds")


def record_path(notebook: str | int, folder: str | Path = RESULTS) -> Path:
    """``folder/NN_full.json`` for notebook ``NN`` (``"01"`` or ``1``)."""
    if isinstance(notebook, bool) or not (
        (isinstance(notebook, int) and 0 <= notebook <= 99)
        or (isinstance(notebook, str) and re.fullmatch(r"\d\d", notebook))
    ):
        raise ValueError(f"A notebook is named by its two-digit number, '01' or 1, got {notebook!r}.")
    return Path(folder) / f"{int(notebook):02d}_full.json"


def full_run_record(run: env.Run, fields: dict[str, Any], seeds: list[int] | None = None) -> dict[str, Any]:
    """The record of a full run: today's date, the device's name, the profile, the versions of the reported
    packages and the seeds (default: the run's), then ``fields`` (what the notebook measured)."""
    if not isinstance(run, env.Run):
        raise TypeError(f"A record is made from the Run that env.setup() returns, got {type(run).__name__}.")
    if clash := sorted(set(fields) & set(HEADER)):
        raise ValueError(f"{', '.join(clash)} are the record's header, written by peftlab: leave them out of fields.")
    seeds = [run.seed] if seeds is None else list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be the whole numbers the runs were seeded with, got {seeds!r}.")
    header = {"date": date.today().isoformat(), "device": env.device_name(run.device), "profile": run.profile,
              "versions": env.package_versions(), "seeds": seeds}  # fmt: skip
    return {**header, **fields}


def write(record: dict[str, Any], path: str | Path, replace: bool = False) -> Path:
    """Write ``record`` as JSON to ``path``, which must not exist unless ``replace`` (then it says what it replaces).

    Refused, before anything is written: a record that is not from a full run, a record without its header, a value
    JSON cannot hold (NaN and infinity included: the prose check could not read them), a results folder that is a
    file."""
    path = Path(path)
    missing = [key for key in HEADER if key not in record]
    if missing:
        raise ValueError(f"The record lacks its header ({', '.join(missing)}): make it with full_run_record.")
    if record["profile"] != "full":
        raise ValueError(
            f"This record comes from the {record['profile']!r} profile: only a full run's numbers are recorded (the "
            "prose quotes them). A smoke run's numbers say only that the code runs: run with PEFTLAB_PROFILE=full."
        )
    if non_finite := _first_non_finite(record):
        raise ValueError(f"The record holds NaN or an infinity ({non_finite}): JSON cannot hold it.")
    text = json.dumps(record, indent=1, default=_plain)
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"{path.parent} is a file, not a folder for the results: move it or choose another.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: a record is a file, e.g. results/01_full.json.")
    if path.exists():
        if not replace:
            raise FileExistsError(
                f"{path} exists (the record of a run on {_describe(path)}): pass replace=True to replace it, or "
                "write elsewhere."
            )
        print(f"replacing {path} (the run on {_describe(path)}) with this run's record")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n")
    partial.replace(path)  # a record appears only when complete
    return path


def write_full_run(
    notebook: str | int,
    run: env.Run,
    fields: dict[str, Any],
    *,
    seeds: list[int] | None = None,
    folder: str | Path = RESULTS,
    replace: bool = False,
) -> Path:
    """Record what notebook ``NN``'s full run measured in ``folder/NN_full.json`` (:func:`full_run_record`,
    :func:`write`): refused in the smoke profile, and over an existing record unless ``replace``."""
    return write(full_run_record(run, fields, seeds), record_path(notebook, folder), replace=replace)


def append_benchmark_run(path: str | Path, device_type: str, run: dict[str, Any]) -> Path:
    """A benchmark's record keeps every run, per device type (``{"cpu": [run, ...], "cuda": [...]}``), so that
    repeated runs show the spread: ``run`` is appended under ``device_type``, the others kept, and the file replaced
    only once the whole text is written."""
    path = Path(path)
    record = json.loads(path.read_text()) if path.exists() else {}
    record.setdefault(device_type, []).append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)
    return path


def read(notebook: str | int, folder: str | Path = RESULTS) -> dict[str, Any] | None:
    """The record of notebook ``NN``'s full run, or ``None`` where there is none (a notebook opened on its own, as
    on Colab). A file that is not a full run's record is an error."""
    path = record_path(notebook, folder)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}).") from error
    if not isinstance(record, dict) or record.get("profile") != "full":
        raise ValueError(f"{path} is not the record of a full run (its profile must be 'full').")
    return record


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays (pandas' cells) as plain Python; anything else JSON cannot hold is named."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"A record holds only numbers, text, lists and dicts; got a {type(value).__name__}: {value!r}.")


def _values(value: Any, where: str = "record"):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _values(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _values(item, f"{where}[{index}]")
    else:
        yield where, value


def _first_non_finite(record: dict) -> str | None:
    for where, value in _values(record):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where} = {value}"
    return None


def _describe(path: Path) -> str:
    """The date and device of the record at ``path``, as far as it can be read."""
    try:
        old = json.loads(path.read_text())
        return f"{old.get('date', 'an unknown date')}, {old.get('device', 'an unknown device')}"
    except (OSError, ValueError, AttributeError):
        return "an unknown date (the file is not a readable record)"
