"""Every figure in a notebook's prose comes from a record: the check, and what it counts as a figure.

    python tools/prose.py notebooks/08_lora.ipynb ...     each figure with no record behind it, one line each

A *figure* is a number a reader takes as a measurement or a count: one with a decimal point (0.871), with thousands
separators (44,236,800), a whole number of 1,000 or more, or any number followed by a unit (16 GB, 3.4 M, 35 %,
6.5 ms, 1.9x). Small whole numbers without a unit (r = 8, 3 seeds, notebook 08, §4) are not figures, nor is
anything inside inline code or LaTeX maths (a derivation's 2Ψ + 2Ψ + KΨ), a link's address, a version number
(transformers 5.24, v0.21.2), a year, a scientific-notation rate (2e-4) or a part of a name (SmolLM2-135M,
Llama-3.2-1B).

A figure is *backed* when a record cited in the notebook's prose holds it: a JSON file named by its path in the
markdown (``results/08_full.json`` beside the notebook, or ``benchmarks/results/...json``, ``data/catalogue.json``
from the repository's root), holding a number that rounds to the figure at the figure's own precision, directly,
in another unit (x100 as a percentage, /2^30 in GiB, x1000 in ms, /10^6 as M, ...), or, for a figure in points,
per cent or x, as the gap, relative change or ratio of two of its numbers under the same key (two accuracies, two
step times). A figure that no record
can hold (a paper's, a hardware fact, a setting of the cell below) is *stated*: the markdown cell's metadata lists
it with its source, ``{"peftlab": {"stated": {"16 GB": "the free Colab T4's memory (NVIDIA's data sheet)"}}}``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: Units after which any number is a figure, with the factors that turn a record's value into that unit.
#: (A record may hold bytes, or a figure already in the unit, under a key such as "peak (MiB)": factor 1.)
BYTES = {"GB": (1e-9, 1.0), "GiB": (2**-30, 1.0), "MB": (1e-6, 1.0), "MiB": (2**-20, 1.0), "KB": (1e-3, 1.0),
         "KiB": (2**-10, 1.0), "TB": (1e-12, 1.0), "TiB": (2**-40, 1.0), "bytes": (1.0,),
         "B/param": (1.0,)}  # fmt: skip
SCALES = {
    **BYTES,
    "%": (100.0, 1.0),
    "points": (100.0, 1.0),
    "pp": (100.0, 1.0),
    "ms": (1000.0, 1.0),
    "s": (1.0,),
    "min": (1 / 60, 1.0),
    "h": (1 / 3600, 1.0),
    "x": (1.0,),
    "×": (1.0,),
    "M": (1e-6, 1.0),
    "B": (1e-9, 1.0),
    "k": (1e-3, 1.0),
    "K": (1e-3, 1.0),
    "GB/s": (1e-9, 1.0),
    "TFLOPS": (1e-12, 1.0),
    "tokens/s": (1.0,),
}
#: Any figure may also be read in these units (a plain 0.871 is an accuracy; 2,388 a count).
PLAIN = (1.0, 100.0)
UNIT = "|".join(sorted((re.escape(unit) for unit in SCALES), key=len, reverse=True))
NUMBER = re.compile(
    r"(?<![\w.,/\-+])(?P<sign>[-−+±]?)(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    rf"(?:[ \u00a0\u202f]?(?P<unit>{UNIT})(?![\w/]))?(?!\w|\.\d)"
)
EXEMPT_SPANS = [
    re.compile(r"```.*?```", re.S),  # code blocks
    re.compile(r"`[^`]*`"),  # inline code
    re.compile(r"\$\$.*?\$\$", re.S),  # display maths
    re.compile(r"\$[^$]+\$"),  # inline maths
    re.compile(r"\]\([^)]*\)"),  # a link's address
    re.compile(r"https?://\S+"),
    re.compile(r"<[^>]+>"),  # HTML tags and their attributes
    # a version: transformers 5.24, torch 2.13.0, v0.21, "peft 0.21.2", "Python 3.11"
    re.compile(
        r"(?i)\b(?:v|version|versions|python|torch|pytorch|transformers|peft|trl|accelerate|bitsandbytes|numpy|"
        r"pandas|deepspeed|nbval|jupyterlab|ipywidgets|cuda|safetensors|datasets|release|releases)[\s=<>!~]*"
        r"\d+(?:\.\d+)+(?:\s*(?:,|and|or|to|–|-)\s*\d+(?:\.\d+)+)*"
    ),
    re.compile(r"\b\d+\.\d+\.\d+\b"),  # any x.y.z
    re.compile(r"(?<![\d,.])(?:19|20)\d\d(?!\d|[.,]\d)"),  # a year
    re.compile(r"\d+(?:\.\d+)?\s?·\s?10[⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+"),  # 2·10⁻⁴
    re.compile(r"\d+(?:\.\d+)?[eE][-−+]?\d+"),  # 2e-4
    re.compile(r"\[\d+\]"),  # a cell index: 01[28]
]
RECORD_PATH = re.compile(r"(?:\.\./)?(?:results|benchmarks/results|data|tests)/[\w./-]+?\.json(?!\w)")


@dataclass(frozen=True)
class Figure:
    text: str  # as written: "0.871", "44,236,800", "3.4 M", "+35.6 %"
    value: float
    decimals: int
    unit: str | None
    cell: int


def _blank(text: str, pattern: re.Pattern) -> str:
    return pattern.sub(lambda match: " " * len(match.group()), text)


def figures(markdown: str, cell: int = 0) -> list[Figure]:
    """The figures in one markdown cell (see the module docstring for what counts)."""
    text = markdown
    for pattern in EXEMPT_SPANS:
        text = _blank(text, pattern)
    found = []
    for match in NUMBER.finditer(text):
        number, unit = match.group("number"), match.group("unit")
        digits = number.replace(",", "")
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        value = float(digits)
        if not (unit or decimals or "," in number or value >= 1000):
            continue
        if unit in {"B", "M", "k", "K", "s", "h", "x"} and not (decimals or "," in number) and value < 10:
            continue  # "1 B parameters" is read, "the 8 s" too; "3 s" or "2x" alone is not worth a record
        found.append(Figure(match.group().strip(), value, decimals, unit, cell))
    return found


def cited_records(notebook_path: Path, markdown: str) -> dict[str, Path]:
    """The JSON records the prose names, resolved beside the notebook or from the repository's root."""
    found = {}
    for name in sorted(set(RECORD_PATH.findall(markdown))):
        for base in (notebook_path.parent, REPO):
            if (base / name).is_file():
                found[name] = (base / name).resolve()
                break
        else:
            raise FileNotFoundError(f"{notebook_path.name} cites {name}, which is neither beside it nor in the repo")
    return found


#: Keys whose text holds digits that are not figures (a checksum, an address).
NOT_FIGURES = {"md5", "sha256", "url", "urls", "commit", "peftlab_commit"}
#: A number inside a record's text that stands alone: "1,115,394 characters", not the digits of "a3f90c" or "5.17.0".
STANDALONE_NUMBER = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w.]|,\d)")


def record_numbers(path: Path) -> dict[str, np.ndarray]:
    """Every number a JSON record holds (booleans left out), grouped by the key it stands under."""
    groups: dict[str, list[float]] = {}

    def walk(node, key: str) -> None:
        if isinstance(node, bool):
            return
        if isinstance(node, int | float):
            groups.setdefault(key, []).append(float(node))
        elif isinstance(node, dict):
            for name, value in node.items():
                walk(value, str(name))
        elif isinstance(node, list):
            for value in node:
                walk(value, key)
        elif isinstance(node, str) and key.lower() not in NOT_FIGURES:
            for number in STANDALONE_NUMBER.findall(node):
                groups.setdefault(key, []).append(float(number.replace(",", "")))

    walk(json.loads(path.read_text()), "")
    return {key: np.unique(np.array(values)) for key, values in groups.items()}


#: Units that say a figure compares two numbers of one kind: a gap (points), a relative change (%), a ratio (x).
COMPARING = {"points", "pp", "%", "x", "×"}


def is_backed(figure: Figure, groups: dict[str, np.ndarray]) -> bool:
    """Whether a record's number rounds to the figure in one of its units; for a gap, a change or a ratio, whether
    two numbers under the same key (two accuracies, two step times) do."""
    tolerance = 0.5 * 10.0**-figure.decimals + 1e-9 * max(1.0, figure.value)
    scales = np.array(SCALES[figure.unit] if figure.unit else PLAIN)
    every = np.abs(np.concatenate(list(groups.values()) or [np.array([])]))
    if np.any(np.abs(np.outer(scales, every) - figure.value) <= tolerance):
        return True
    if figure.unit not in COMPARING:
        return False
    for values in groups.values():
        values = np.abs(values)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = (values[:, None] / values[None, :]).ravel()
        ratios = ratios[np.isfinite(ratios)]
        if figure.unit in {"x", "×"}:
            candidates = ratios
        else:  # a gap in points, a relative change or a share in per cent
            gaps = np.abs(values[:, None] - values[None, :]).ravel()
            candidates = np.concatenate([gaps * 100, np.abs(ratios - 1) * 100, ratios * 100])
        if np.any(np.abs(candidates - figure.value) <= tolerance):
            return True
    return False


def stated(cell) -> dict[str, str]:
    """The figures a markdown cell states with their source, from its ``peftlab.stated`` metadata."""
    return dict(cell.get("metadata", {}).get("peftlab", {}).get("stated", {}))


def unbacked(notebook_path: Path) -> list[str]:
    """One sentence per figure of the notebook's prose that no cited record holds and no metadata states."""
    notebook = nbformat.read(notebook_path, as_version=4)
    markdown = [(index, cell) for index, cell in enumerate(notebook.cells) if cell.cell_type == "markdown"]
    records = cited_records(notebook_path, "\n".join(cell.source for _, cell in markdown))
    groups: dict[str, np.ndarray] = {}
    for path in records.values():
        for key, values in record_numbers(path).items():
            groups[key] = np.unique(np.concatenate([groups.get(key, np.array([])), values]))
    problems = []
    for index, cell in markdown:
        sources = stated(cell)
        for name, source in sources.items():
            if not str(source).strip():
                problems.append(f"cell {index}: the stated figure {name!r} names no source")
        for figure in figures(cell.source, index):
            if figure.text in sources or figure.text.lstrip("-−+±") in sources:
                continue
            if not is_backed(figure, groups):
                problems.append(
                    f"cell {index}: {figure.text!r} is in no record the notebook cites ({', '.join(records) or 'none'})"
                    " — cite the record that holds it, or state its source in the cell's peftlab.stated metadata"
                )
    return problems


def main(argv: list[str]) -> int:
    status = 0
    for name in argv:
        for problem in unbacked(Path(name)):
            print(f"{name}: {problem}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
