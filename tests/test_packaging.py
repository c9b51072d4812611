"""The install story: the tested set in constraints.txt agrees with pyproject.toml and environment.yml, the
Makefile's torch fits, the newest-releases check has a record, CI calls make test."""

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from peftlab import install

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import releases  # noqa: E402


def test_constraints_pin_every_requirement_within_its_bounds_and_nothing_else():
    assert releases.check() == []


def test_the_check_names_what_to_change(tmp_path):
    requirements = [Requirement("transformers>=5.0"), Requirement("peft>=0.18"), Requirement("torch>=2.4")]
    closure = {"transformers": "5.24.0", "peft": "0.21.2", "tokenizers": "0.23.3"}
    pins = {"transformers": "4.57.0", "tokenizers": "0.23.3", "left-pad": "1.0"}
    found = releases.problems(pins, requirements, closure)
    assert found == [
        "constraints.txt pins transformers==4.57.0, outside pyproject.toml's transformers>=5.0: change the bound or "
        "the pin (make lock pins what the suite passed with).",
        "peft is a requirement in pyproject.toml but has no pin in constraints.txt: run make lock.",
        "constraints.txt pins left-pad, which neither pyproject.toml nor any of its dependencies needs here: remove "
        "the line, or add the package to pyproject.toml.",
    ]
    bad = tmp_path / "constraints.txt"
    bad.write_text("peft>=0.18\n")
    with pytest.raises(install.ConstraintsError, match=r"constraints.txt:1: 'peft>=0.18' is not an exact pin"):
        install.read_constraints(bad)
    bad.write_text("# ok\ntorch==2.13.0\n")
    with pytest.raises(install.ConstraintsError, match="torch follows TORCH_SPEC"):
        install.read_constraints(bad)
    bad.write_text("PEFT==0.21.2\npeft==0.21.1\n")
    with pytest.raises(install.ConstraintsError, match=":2: peft is pinned twice"):
        install.read_constraints(bad)


def test_environment_yml_brings_python_and_torch_and_pip_installs_the_rest_through_the_constraints():
    dependencies = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    conda = [entry for entry in dependencies if isinstance(entry, str)]
    pip = [entry for section in dependencies if isinstance(section, dict) for entry in section["pip"]]
    torch_bound = next(str(r.specifier) for r in releases.pyproject_requirements() if r.name == "torch")
    python_bound = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert conda == [f"python{python_bound}", f"pytorch{torch_bound}", "pip"]
    assert pip == ["-c constraints.txt", "-e .[lab,test]"]


def test_only_lower_bounds_unless_a_cap_is_explained():
    for requirement in releases.pyproject_requirements():
        assert all(spec.operator == ">=" for spec in requirement.specifier), f"{requirement}: explain any cap"


def test_the_makefile_torch_satisfies_pyproject():
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    torch_bound = next(r.specifier for r in releases.pyproject_requirements() if r.name == "torch")
    assert SpecifierSet(str(torch_bound)).contains(torch_spec)


def test_the_makefile_installs_through_the_constraints_and_keeps_the_installed_torch():
    makefile = (REPO / "Makefile").read_text()
    assert '-m pip install -q -c constraints.txt -e ".[lab,test]"' in makefile
    assert "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')" in makefile
    assert "--allow-root" in makefile and "$(LAB_ARGS)" in makefile
    assert "notebooks/00_setup_and_tour.ipynb" in makefile  # the tour opens, with the repository as the root


def test_colab_pins_the_taught_libraries_and_whatever_colab_lacks_and_leaves_the_rest():
    pins = {"transformers": "5.24.0", "numpy": "2.4.6", "peft": "0.21.2", "gguf": "0.19.0", "tqdm": "4.70.1"}
    colab_has = {"transformers", "numpy", "tqdm", "torch", "google-colab"}
    assert install.colab_constraints(pins, colab_has) == ["gguf==0.19.0", "peft==0.21.2", "transformers==5.24.0"]


def test_colab_installs_peftlabs_base_requirements_then_the_models():
    commands, pinned = [], []

    def record(command):  # the constraints file exists while the commands run, and is removed after
        commands.append(command)
        if "-c" in command:
            pinned.extend(Path(command[command.index("-c") + 1]).read_text().split())

    install.colab(run=record)
    pip, models = commands
    assert pip[1:5] == ["-m", "pip", "install", "-q"] and pip[5] == "-c" and not Path(pip[6]).exists()
    assert f"transformers=={install.read_constraints()['transformers']}" in pinned
    installed_here = ("numpy==", "pytest==", "jupyterlab==")  # as Colab has its own
    assert not any(line.startswith(installed_here) for line in pinned)
    assert "transformers>=5.0" in pip[7:] and not any("jupyterlab" in r or "pytest" in r for r in pip[7:])
    assert models[1:] == ["-m", "peftlab.models", "install"]


def test_the_newest_releases_were_checked_and_the_record_says_what_broke():
    record = json.loads((REPO / "tests" / "latest_releases.json").read_text())
    assert {"date", "green", "versions", "failing", "expected_failures", "newer_than_constraints"} <= set(record)
    assert record["versions"]["transformers"] and record["tests"]["tests"] > 0
    assert all(row["first_error_line"] for row in record["failing"])
    assert record["green"] == (not record["failing"] and all(s == "passed" for s in record["steps"].values()))


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme and "make test-latest" in readme
