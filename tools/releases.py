"""The tested releases and the newest ones: check the constraints file, test the newest releases, refresh the pins.

    python tools/releases.py check             what is wrong with constraints.txt (exit 1 if anything)
    python tools/releases.py latest            a fresh .venv-latest with the newest release of every dependency,
                                               the whole suite there, and its record in tests/latest_releases.json
    python tools/releases.py lock [VENV]       rewrite constraints.txt from an environment (default .venv-latest)

``make test-latest`` and ``make lock`` call the last two. The loop, when ``make test-latest`` is green:
``make lock`` (the newest releases become the tested set), ``make test`` in a fresh clone, commit both files.

constraints.txt holds every package that peftlab's requirements (with the ``lab`` and ``test`` extras) pull in,
except torch and what only torch needs (torch follows ``TORCH_SPEC``; on Colab it is Colab's own).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ElementTree
from datetime import date
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from peftlab.install import ConstraintsError, normalise, read_constraints  # noqa: E402

CONSTRAINTS = REPO / "constraints.txt"
RECORD = REPO / "tests" / "latest_releases.json"
LATEST_VENV = REPO / ".venv-latest"
EXTRAS = ("lab", "test")
#: A terminal colour code, as nbval writes it and as pytest's junit file escapes it
ANSI_COLOUR = re.compile(r"(?:\x1b|#x1B)\[[0-9;]*m")
#: Not pinned: torch follows TORCH_SPEC; the packaging tools belong to the environment.
UNPINNED = {"torch", "pip", "setuptools", "wheel"}
HEADER = """\
# The tested set: the exact releases that peftlab's whole test suite last passed with (python {python}, {system}).
# make lab, make test, the conda route and the Colab cell install through this file (pip install -c constraints.txt).
# torch is not here: it follows TORCH_SPEC (the CPU wheel on a CPU box, a CUDA build on a GPU box, Colab's own).
# Written by `make lock` from an environment where `make test-latest` passed; do not edit by hand.
"""


# ----------------------------------------------------------------------------------------------------------------
# What pyproject asks for, and what that pulls in
# ----------------------------------------------------------------------------------------------------------------
def pyproject_requirements(extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """peftlab's requirements in pyproject.toml: the dependencies and the given extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in listed]


def dependency_closure(roots: list[Requirement], stop: set[str] = UNPINNED) -> dict[str, str]:
    """``{name: installed version}`` of every distribution that ``roots`` pull in here, never walking into ``stop``.

    Markers are evaluated for this interpreter and platform, with the extras each requirement asks for.
    """
    import importlib.metadata

    found: dict[str, str] = {}
    walked: set[tuple[str, str]] = set()
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        name = normalise(requirement.name)
        extras = sorted(requirement.extras) or [""]
        if name in stop or all((name, extra) in walked for extra in extras):
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as error:
            raise ConstraintsError(f"{name} is required but not installed here: run `make install` first.") from error
        found[name] = distribution.version
        walked.update((name, extra) for extra in extras)
        for line in distribution.requires or []:
            child = Requirement(line)
            if child.marker is None or any(
                child.marker.evaluate({**default_environment(), "extra": extra}) for extra in extras
            ):
                pending.append(child)
    return found


def problems(pins: dict[str, str], requirements: list[Requirement], closure: dict[str, str]) -> list[str]:
    """Where the constraints file and pyproject.toml disagree, one sentence each that says what to change."""
    found = []
    for requirement in requirements:
        name = normalise(requirement.name)
        if name in UNPINNED:
            continue
        if name not in pins:
            found.append(f"{name} is a requirement in pyproject.toml but has no pin in constraints.txt: run make lock.")
        elif not requirement.specifier.contains(Version(pins[name]), prereleases=True):
            found.append(
                f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}: change the bound "
                "or the pin (make lock pins what the suite passed with)."
            )
    for name in sorted(set(pins) - set(closure)):
        found.append(
            f"constraints.txt pins {name}, which neither pyproject.toml nor any of its dependencies needs here: "
            "remove the line, or add the package to pyproject.toml."
        )
    return found


def check() -> list[str]:
    """The problems of the repository's constraints file against pyproject.toml and this environment."""
    try:
        pins = read_constraints(CONSTRAINTS)
    except ConstraintsError as error:
        return [str(error)]
    requirements = pyproject_requirements()
    return problems(pins, requirements, dependency_closure(requirements))


# ----------------------------------------------------------------------------------------------------------------
# The newest releases
# ----------------------------------------------------------------------------------------------------------------
def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, command)), flush=True)
    return subprocess.run(command, cwd=REPO, **kwargs)


def index_reachable(python: str) -> str | None:
    """``None`` when pip can see the package index, else pip's complaint (first line)."""
    done = subprocess.run([python, "-m", "pip", "index", "versions", "transformers"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no answer"])[-1]


def junit_outcomes(path: Path) -> dict:
    """Counts, failures (test, first error line) and expected failures (test, reason) of a pytest junit file."""
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failing, expected = [], []
    for case in suite.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name')}"
        for kind in ("failure", "error"):
            element = case.find(kind)
            if element is not None:
                message = ANSI_COLOUR.sub("", element.get("message") or element.text or "").strip().splitlines()
                failing.append({"test": test, "kind": kind, "first_error_line": message[0] if message else ""})
        skipped = case.find("skipped")
        if skipped is not None and skipped.get("type") == "pytest.xfail":
            expected.append({"test": test, "reason": skipped.get("message", "")})
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {"counts": counts, "failing": failing, "expected_failures": expected}


def latest() -> int:
    """Build .venv-latest with the newest releases, run the whole suite there, write the record; 0 when green."""
    python = sys.executable
    if reason := index_reachable(python):
        print(
            f"make test-latest needs a package index to find the newest releases, and pip reached none ({reason}).\n"
            "Connect to the network (or set PIP_INDEX_URL to a mirror) and run it again. Nothing was changed.",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    torch_spec = os.environ.get("LATEST_TORCH_SPEC") or os.environ.get("TORCH_SPEC", "torch==2.13.0")
    shutil.rmtree(LATEST_VENV, ignore_errors=True)
    _run([python, "-m", "venv", str(LATEST_VENV)], check=True)
    venv_python = str(LATEST_VENV / "bin" / "python")
    _run([venv_python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    _run([venv_python, "-m", "pip", "install", "-q", torch_spec], check=True)
    # The eager upgrade would swap torch for its newest build (a CUDA wheel of several GB): hold the one installed.
    held_torch = LATEST_VENV / "torch-held.txt"
    installed_torch = subprocess.run([venv_python, "-c", "import torch; print(torch.__version__)"],
                                     capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    held_torch.write_text(f"torch=={installed_torch}\n")
    _run([venv_python, "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", "-c", str(held_torch),
          "-e", f".[{','.join(EXTRAS)}]"], check=True)  # fmt: skip
    _run([venv_python, "-m", "peftlab.models", "install"], check=True)
    environment = {**os.environ, "PEFTLAB_PROFILE": "smoke"}
    shared = REPO.parent / "shared" / "data"
    if not environment.get("PEFTLAB_DATA_DIR") and shared.is_dir():
        environment["PEFTLAB_DATA_DIR"] = str(shared)  # as CI does
    bin_dir = LATEST_VENV / "bin"
    steps = {
        "ruff check": [str(bin_dir / "ruff"), "check", "."],
        "ruff format --check": [str(bin_dir / "ruff"), "format", "--check", "peftlab", "tests", "tools"],
    }
    results = {name: _run(command, env=environment).returncode for name, command in steps.items()}
    junit = LATEST_VENV / "junit.xml"
    # The run that writes the record cannot check it: the record's own test is left out, and the record says so.
    deselected = ["tests/test_packaging.py::test_the_newest_releases_were_checked_and_the_record_says_what_broke"]
    results["pytest"] = _run([venv_python, "-m", "pytest", "-q", f"--junitxml={junit}",
                              *(f"--deselect={test}" for test in deselected)], env=environment).returncode  # fmt: skip
    versions = json.loads(subprocess.run([venv_python, __file__, "versions"], capture_output=True, text=True,
                                         check=True, cwd=REPO).stdout)  # fmt: skip
    pins = read_constraints(CONSTRAINTS)
    moved = {name: {"tested": pins.get(name), "latest": version} for name, version in versions["closure"].items()
             if pins.get(name) != version}  # fmt: skip
    outcome = junit_outcomes(junit) if junit.exists() else {"counts": {}, "failing": [], "expected_failures": []}
    green = all(code == 0 for code in results.values())
    record = {
        "date": date.today().isoformat(),
        "command": "make test-latest",
        "machine": f"{platform.system()} {platform.machine()}, python {platform.python_version()}",
        "torch": {"spec": torch_spec, "version": versions["torch"]},
        "data_dir": environment.get("PEFTLAB_DATA_DIR"),
        "green": green,
        "steps": {name: "passed" if code == 0 else f"failed (exit {code})" for name, code in results.items()},
        "tests": outcome["counts"],
        "failing": outcome["failing"],
        "expected_failures": outcome["expected_failures"],
        "deselected": deselected,
        "newer_than_constraints": moved,
        "versions": versions["closure"],
        "minutes": round((time.time() - started) / 60, 1),
    }
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    verdict = (
        "green: the newest releases pass; refresh the tested set with `make lock`"
        if green
        else (f"red: {len(outcome['failing'])} failing; keep constraints.txt, and see {RECORD.relative_to(REPO)}")
    )
    print(f"\nmake test-latest is {verdict} ({len(moved)} packages newer than constraints.txt).")
    return 0 if green else 1


def versions() -> dict:
    """What this environment holds (run inside the environment): the closure of pyproject's requirements, torch."""
    import importlib.metadata

    closure = dependency_closure(pyproject_requirements())
    return {"closure": dict(sorted(closure.items())), "torch": importlib.metadata.version("torch")}


def lock(venv: Path) -> int:
    """Rewrite constraints.txt with the releases installed in ``venv``."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"No environment at {venv}: run `make test-latest` first (it builds {LATEST_VENV.name}).",
              file=sys.stderr)  # fmt: skip
        return 2
    if venv == LATEST_VENV and RECORD.exists() and not json.loads(RECORD.read_text()).get("green"):
        print(f"{RECORD.relative_to(REPO)} says the newest releases are red: mend that before pinning them.",
              file=sys.stderr)  # fmt: skip
        return 1
    found = json.loads(subprocess.run([str(python), __file__, "versions"], capture_output=True, text=True,
                                      check=True, cwd=REPO).stdout)  # fmt: skip
    python_version = subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                                    capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    lines = [f"{name}=={version}" for name, version in found["closure"].items()]
    CONSTRAINTS.write_text(HEADER.format(python=python_version, system=platform.system()) + "\n".join(lines) + "\n")
    print(f"constraints.txt: {len(lines)} pins from {venv.name}. Now run `make test` in a fresh clone, then commit.")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"]:
        found = check()
        print("\n".join(found) or "constraints.txt agrees with pyproject.toml")
        return 1 if found else 0
    if argv[:1] == ["latest"]:
        return latest()
    if argv[:1] == ["versions"]:
        print(json.dumps(versions()))
        return 0
    if argv[:1] == ["lock"] and len(argv) <= 2:
        return lock(Path(argv[1]).resolve() if len(argv) == 2 else LATEST_VENV)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
