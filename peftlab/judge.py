"""Judging answers that can be checked: the instructions of ``data/instructions.jsonl`` whose answer is a label, a
few numbers or a JSON object, with the answer key of ``data/judged.jsonl`` (70 items, 35 English, 35 Chinese).

A loss says how likely the reference answer is; a user sees the model's own answer. For these items an answer is
*correct* by a rule that is written down and tested (normalised match, not a judge model):

- ``label`` (headline sentiment): the answer names exactly one of the three label words (bearish / bullish /
  neutral, 利空 / 利好 / 中性), the expected one. An answer that names two or all three (one that echoes the
  options of the question, say) is wrong: a rule that took the first word named passed such an echo on 10 of the 30
  items, since every question lists the options in the same order;
- ``numbers`` (arithmetic word problems): every expected number is among the numbers the answer writes (thousands
  separators and currency signs ignored, 600 = 600.0);
- ``json`` (extraction): the JSON object that starts at the answer's first ``{`` parses, with the expected keys and
  values (strings compared without case and surrounding spaces, numbers by value).

The rules are lenient about wording and strict about the content, so that a model which answers in a sentence is
not marked wrong for it.
"""

from __future__ import annotations

import json
import re

from . import data

KINDS = ("label", "numbers", "json")
LABEL_WORDS = {"en": ("bearish", "bullish", "neutral"), "zh": ("利空", "利好", "中性")}
NUMBER = re.compile(r"(?<![\d.])\d[\d,]*(?:\.\d+)?")


def items() -> list[dict]:
    """The judged instructions: the rows of ``instructions.jsonl`` the key names, with their ``kind`` and ``answer``."""
    rows = {row["id"]: row for split in data.SPLITS for row in data.load("instructions", split)}
    judged = []
    for line_number, line in enumerate((data.project_data_dir() / "judged.jsonl").read_text("utf-8").splitlines(), 1):
        key = json.loads(line)
        if key.get("id") not in rows or key.get("kind") not in KINDS:
            raise data.DataError(f"judged.jsonl:{line_number}: unknown id or kind in {key!r}")
        judged.append({**rows[key["id"]], "kind": key["kind"], "answer": key["answer"]})
    return judged


def numbers_in(text: str) -> list[float]:
    """The numbers an answer writes, in order: '$1,210.00' → 1210.0."""
    return [float(match.replace(",", "")) for match in NUMBER.findall(text)]


def _first_json_object(text: str):
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except json.JSONDecodeError:
        return None


def _same_value(expected, got) -> bool:
    if isinstance(expected, str):
        return isinstance(got, str) and got.strip().casefold() == expected.strip().casefold()
    if isinstance(expected, int | float) and not isinstance(got, bool):
        try:
            return float(got) == float(expected)
        except (TypeError, ValueError):
            return False
    return got == expected


def is_correct(item: dict, answer: str) -> bool:
    """Whether ``answer`` gives the item's expected answer, by the rule of its ``kind`` (module docstring)."""
    if item["kind"] == "label":
        named = [word for word in LABEL_WORDS[item["lang"]] if word in answer.casefold()]
        return named == [item["answer"]]
    if item["kind"] == "numbers":
        written = numbers_in(answer)
        return all(float(number) in written for number in item["answer"])
    if item["kind"] == "json":
        parsed = _first_json_object(answer)
        return (
            isinstance(parsed, dict)
            and set(parsed) == set(item["answer"])
            and all(_same_value(value, parsed[key]) for key, value in item["answer"].items())
        )
    raise ValueError(f"Unknown kind {item['kind']!r}; judged kinds are {KINDS}")


def score(judged: list[dict], answers: list[str]) -> dict[str, float]:
    """The share of correct answers: overall, per language and per kind (``{"all": …, "en": …, "numbers": …}``)."""
    if len(judged) != len(answers) or not judged:
        raise ValueError(f"score needs one answer per item: {len(judged)} items, {len(answers)} answers")
    correct = [is_correct(item, answer) for item, answer in zip(judged, answers, strict=True)]
    groups = {"all": range(len(judged))}
    for field in ("lang", "kind"):
        for value in sorted({item[field] for item in judged}):
            groups[value] = [i for i, item in enumerate(judged) if item[field] == value]
    return {name: sum(correct[i] for i in members) / len(members) for name, members in groups.items()}
