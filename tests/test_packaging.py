"""The install story: pyproject.toml and environment.yml agree, the Makefile's torch fits, CI calls make test."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name
NOT_PACKAGES = {"python", "pip", "-e ."}


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in listed}


def environment_requirements() -> dict[str, str]:
    dependencies = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    conda = [entry for entry in dependencies if isinstance(entry, str)]
    pip = [entry for section in dependencies if isinstance(section, dict) for entry in section["pip"]]
    found = {}
    for entry in conda + pip:
        if entry in NOT_PACKAGES or entry.startswith("python"):
            continue
        requirement = Requirement(entry.replace(" ", ""))
        found[CONDA_NAMES.get(requirement.name.lower(), requirement.name.lower())] = str(requirement.specifier)
    return found


def test_environment_yml_lists_the_same_packages_and_bounds_as_pyproject():
    assert environment_requirements() == pyproject_requirements()


def test_only_lower_bounds_unless_a_cap_is_explained():
    for name, specifier in pyproject_requirements().items():
        assert all(spec.operator == ">=" for spec in SpecifierSet(specifier)), f"{name}{specifier}: explain any cap"


def test_the_makefile_torch_satisfies_pyproject():
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert SpecifierSet(pyproject_requirements()["torch"]).contains(torch_spec)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
