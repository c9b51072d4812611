"""Installing the tested set: the constraints file, and the install that the first cell of every notebook runs on Colab.

The exact releases that the test suite last passed with live in one file, ``constraints.txt`` (``name==version``
per line, torch left out: it follows ``TORCH_SPEC`` in the Makefile, or the platform's own build). ``make lab``,
``make test`` and the conda route install through it. ``tools/releases.py`` checks the newest releases against it
and rewrites it when they pass.

On Colab (``python -m peftlab.install colab``, after ``pip install --no-deps peftlab@<release>``) the platform
already holds torch, numpy, pandas, matplotlib and its own notebook stack, and upgrading those under a running
kernel breaks Colab. So the pins apply to the libraries the workbook teaches and checks against (``COLAB_PINNED``)
and to whatever Colab lacks; what Colab has already, and satisfies peftlab's lower bounds, stays as it is.

Only the standard library here: this module runs before peftlab's dependencies are installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

#: The libraries whose behaviour the notebooks depend on: on Colab they are installed at exactly the tested release.
COLAB_PINNED = ("transformers", "peft", "trl", "accelerate", "safetensors", "tokenizers", "huggingface-hub", "gguf",
                "bitsandbytes")  # fmt: skip
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)$")


class ConstraintsError(ValueError):
    """A constraints file that pip would misread, or that names a package peftlab does not need."""


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Huggingface_Hub`` -> ``huggingface-hub``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints_path() -> Path:
    """The constraints file: the repository's in a checkout, the copy inside the package in a wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "constraints.txt", package / "_constraints.txt"):
        if candidate.is_file():
            return candidate
    raise ConstraintsError(f"peftlab's constraints.txt is missing (looked beside {package}). Reinstall peftlab.")


def read_constraints(path: Path | None = None) -> dict[str, str]:
    """``{normalised name: version}`` of a constraints file: one ``name==version`` per line, ``#`` comments."""
    path = path or constraints_path()
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            raise ConstraintsError(
                f"{path}:{number}: {line!r} is not an exact pin: write one 'name==version' per line "
                "(ranges belong in pyproject.toml; the constraints file holds the tested releases)."
            )
        name = normalise(match["name"])
        if name in pins:
            raise ConstraintsError(f"{path}:{number}: {match['name']} is pinned twice: keep one line.")
        pins[name] = match["version"]
    if "torch" in pins:
        raise ConstraintsError(
            f"{path}: torch is pinned, but torch follows TORCH_SPEC (the CPU wheel here, a CUDA build on a GPU box, "
            "Colab's own on Colab): remove the torch line."
        )
    return pins


def installed() -> set[str]:
    """Normalised names of the distributions installed in this environment."""
    return {normalise(dist.metadata["Name"]) for dist in importlib.metadata.distributions() if dist.metadata["Name"]}


def colab_constraints(pins: dict[str, str], present: set[str]) -> list[str]:
    """The pins that apply on Colab: every package in :data:`COLAB_PINNED`, and every package Colab does not have."""
    keep = {normalise(name) for name in COLAB_PINNED}
    return [f"{name}=={version}" for name, version in sorted(pins.items()) if name in keep or name not in present]


def base_requirements() -> list[str]:
    """peftlab's own requirements (no extras), as its installed metadata lists them."""
    listed = importlib.metadata.requires("peftlab") or []
    return [requirement for requirement in listed if "extra ==" not in requirement]


def colab(run: Callable[[list[str]], object] | None = None) -> list[list[str]]:
    """On Colab: peftlab's dependencies through the Colab constraints, then the two offline base models.

    ``run`` executes each command (default: ``subprocess.run(..., check=True)``); the commands are also returned.
    """
    run = run or (lambda command: subprocess.run(command, check=True))
    lines = colab_constraints(read_constraints(), installed())
    print(f"Installing peftlab's dependencies ({len(lines)} tested releases pinned; Colab keeps its own torch, "
          "numpy and notebook stack) and the two offline base models ...", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:  # removed afterwards, also when pip fails
        pins = Path(folder) / "constraints.txt"
        pins.write_text("\n".join(lines) + "\n", encoding="utf-8")
        commands = [
            [sys.executable, "-m", "pip", "install", "-q", "-c", str(pins), *base_requirements()],
            [sys.executable, "-m", "peftlab.models", "install"],
        ]
        for command in commands:
            run(command)
    return commands


if __name__ == "__main__":
    if sys.argv[1:] == ["colab"]:
        colab()
    else:
        print("usage: python -m peftlab.install colab", file=sys.stderr)
        sys.exit(2)
