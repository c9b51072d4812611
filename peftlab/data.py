"""Data sets by name, prompt formatting, label masking and collators.

Two kinds of data set, one loader (:func:`load`):

* the project's own **teaching sets** in ``data/`` (``fin_headlines``, ``instructions``, ``preferences``), small and
  written for this workbook (see ``data/DATASHEET.md``): the smoke profile runs on them, with no data folder at all;
* **public sets** listed in ``data/catalogue.json`` (source, licence, md5). They are never committed: peftlab reads
  them from ``$PEFTLAB_DATA_DIR`` (CI: ``../shared/data``), or downloads them when the user asks
  (``download=True`` or ``PEFTLAB_DOWNLOAD=1``) into ``$PEFTLAB_HOME/data``, checking each file's md5.

Every set comes back as a list of plain dicts in one schema per task:

* ``classification``: ``{"text": str, "label": int}``
* ``instruction``: ``{"instruction": str, "input": str, "output": str}``
* ``preference``: ``{"messages": [{"role", "content"}, ...], "chosen": str, "rejected": str}``
* ``text``: ``{"text": str}`` (poems also carry ``title`` and ``author``)
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.models import home_dir

#: Text fields that may not be empty or white space (an instruction's ``input`` may be).
NON_EMPTY = ("text", "instruction", "output", "prompt", "chosen", "rejected", "value")

#: The value that ``torch.nn.functional.cross_entropy`` ignores: labels of tokens the loss must not see.
IGNORE_INDEX = -100

TEACHING_SETS = {
    "fin_headlines": {
        "file": "fin_headlines.jsonl",
        "task": "classification",
        "labels": ("bearish", "bullish", "neutral"),
    },
    "instructions": {"file": "instructions.jsonl", "task": "instruction"},
    "preferences": {"file": "preferences.jsonl", "task": "preference"},
}
SPLITS = ("train", "validation")
#: Teaching sets are split deterministically: every fifth row (per language) is validation.
VALIDATION_EVERY = 5


class DataError(ValueError):
    """A data set that is unknown, missing, damaged or malformed."""


# ----------------------------------------------------------------------------------------------------------------
# Where data lives
# ----------------------------------------------------------------------------------------------------------------
def project_data_dir() -> Path:
    """The project's ``data/`` folder: beside the package in a checkout, inside it (``_data``) in a wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "data", package / "_data"):
        if (candidate / "catalogue.json").exists():
            return candidate
    raise DataError(f"peftlab's data folder is missing (looked beside {package}). Reinstall peftlab.")


def catalogue() -> dict[str, dict]:
    """The public data sets peftlab knows, by name: description, task, source, licence, files with md5."""
    entries = json.loads((project_data_dir() / "catalogue.json").read_text(encoding="utf-8"))
    return {name: entry for name, entry in entries.items() if not name.startswith("_")}


def dataset_names() -> list[str]:
    """Every name :func:`load` accepts: the teaching sets, then the public sets."""
    return [*TEACHING_SETS, *catalogue()]


def public_data_dir() -> Path | None:
    """The folder named by ``$PEFTLAB_DATA_DIR``, or ``None`` when the variable is unset."""
    value = os.environ.get("PEFTLAB_DATA_DIR")
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"PEFTLAB_DATA_DIR={value!r} is not a folder. Point it at the folder that holds the public data sets "
            "(in CI: ../shared/data), or unset it and download with download=True."
        )
    return folder


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_md5(path: Path, expected: str, remedy: str) -> Path:
    actual = md5_of(path)
    if actual != expected:
        raise DataError(
            f"{path} has md5 {actual}, but the catalogue expects {expected}: the file is damaged or another "
            f"version. {remedy}"
        )
    return path


def _download(url: str, target: Path, md5: str) -> Path:
    """Fetch ``url`` to ``target``, checked against ``md5``; the file appears only when it is complete and right."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    print(f"Downloading {url} -> {target}")
    try:
        urllib.request.urlretrieve(url, partial)
    except (OSError, urllib.error.URLError) as error:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"Could not download {url} ({getattr(error, 'reason', error)}). Check the network (or a proxy), or "
            f"put the catalogued file at {target} yourself."
        ) from error
    try:
        _check_md5(partial, md5, "The download was not the catalogued file: try again later, or report it.")
    except DataError:
        partial.unlink(missing_ok=True)  # nothing half-right stays behind
        raise
    partial.replace(target)
    return target


def public_file(name: str, split: str, download: bool | None = None) -> Path:
    """The local path of one split of a public set, checked against its md5 (downloaded if asked for)."""
    entry = catalogue()[name]
    if split not in entry["splits"]:
        raise DataError(f"{name!r} has no split {split!r}; it has {', '.join(entry['splits'])}.")
    spec = entry["splits"][split]
    folder = public_data_dir()
    cached = home_dir() / "data" / spec["path"]
    if download is None:
        download = os.environ.get("PEFTLAB_DOWNLOAD", "") == "1"
    if folder and (folder / spec["path"]).exists():  # the user's folder: never written to
        return _check_md5(folder / spec["path"], spec["md5"],
                          f"Replace it in PEFTLAB_DATA_DIR={folder} with the catalogued file, or unset "
                          f"PEFTLAB_DATA_DIR and download=True fetches it into {home_dir() / 'data'}.")  # fmt: skip
    if cached.exists():
        if download and md5_of(cached) != spec["md5"]:  # peftlab's own copy is damaged: fetch it again
            return _download(spec["url"], cached, spec["md5"])
        return _check_md5(cached, spec["md5"], f"download=True replaces it (peftlab's own copy in {cached.parent}).")
    if download:
        return _download(spec["url"], cached, spec["md5"])
    where = f"in PEFTLAB_DATA_DIR={folder}" if folder else "(PEFTLAB_DATA_DIR is not set)"
    raise DataError(
        f"Data set {name!r} needs {spec['path']}, not found {where} nor in {home_dir() / 'data'}. Either set "
        f"PEFTLAB_DATA_DIR to a folder holding it (in CI: ../shared/data), or, online, download it: "
        f"peftlab.data.load({name!r}, download=True) or PEFTLAB_DOWNLOAD=1."
    )


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking rows
# ----------------------------------------------------------------------------------------------------------------
def _require(row: dict, fields: dict[str, type], where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields {', '.join(fields)}, got {type(row).__name__}.")
    for field, kind in fields.items():
        if field not in row:
            raise DataError(
                f"{where}: field {field!r} is missing (expected: {', '.join(fields)}). Fix or drop the row."
            )
        value = row[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(
                f"{where}: field {field!r} should be {kind.__name__}, got {type(value).__name__} "
                f"({value!r:.60}). Fix or drop the row."
            )
        if kind is str and field in NON_EMPTY and not value.strip():
            raise DataError(
                f"{where}: field {field!r} is empty: a model cannot learn from no text. Fix or drop the row."
            )


def _check_label(label: int, labels: tuple[str, ...], where: str) -> int:
    if not 0 <= label < len(labels):
        raise DataError(f"{where}: label {label} is out of range 0..{len(labels) - 1} ({', '.join(labels)}).")
    return label


def read_text(path: Path, encodings: tuple[str, ...] = ("utf-8",)) -> tuple[str, str]:
    """The text of a file and the encoding that read it: the first of ``encodings`` that decodes it whole. When none
    does, the error names the file and the line of the first byte UTF-8 cannot read."""
    raw = path.read_bytes()
    for encoding in encodings:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: byte {raw[error.start : error.start + 1]!r} is not UTF-8"
            + (f" (nor {', '.join(encodings[1:])})" if len(encodings) > 1 else "")
            + ". Save the file as UTF-8, or name its encoding."
        ) from error
    raise AssertionError("unreachable: UTF-8 failed above")


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(read_text(path)[0].splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg}). Fix or drop the line.") from error
    return rows


def _teaching_rows(name: str, path: Path) -> list[dict]:
    task = TEACHING_SETS[name]["task"]
    rows = []
    for where, row in _read_jsonl(path):
        _require(row, {"id": str, "lang": str}, where)
        if task == "classification":
            _require(row, {"text": str, "label": int}, where)
            _check_label(row["label"], label_names(name), where)
            rows.append({"text": row["text"], "label": row["label"], "lang": row["lang"], "id": row["id"]})
        elif task == "instruction":
            _require(row, {"instruction": str, "input": str, "output": str}, where)
            rows.append({k: row[k] for k in ("instruction", "input", "output", "lang", "id")})
        else:
            _require(row, {"prompt": str, "chosen": str, "rejected": str, "flaw": str}, where)
            messages = [{"role": "user", "content": row["prompt"]}]
            rows.append({"messages": messages, "chosen": row["chosen"], "rejected": row["rejected"],
                         "flaw": row["flaw"], "lang": row["lang"], "id": row["id"]})  # fmt: skip
    return rows


def _split_teaching(rows: list[dict], split: str) -> list[dict]:
    """Every fifth row of each language is validation; the rest is train."""
    position: dict[str, int] = {}
    chosen = []
    for row in rows:
        index = position[row["lang"]] = position.get(row["lang"], -1) + 1
        is_validation = index % VALIDATION_EVERY == VALIDATION_EVERY - 1
        if is_validation == (split == "validation"):
            chosen.append(row)
    return chosen


def _read_fin_tweets(path: Path) -> list[dict]:
    labels = label_names("fin_tweets")
    rows = []
    with io.StringIO(read_text(path)[0], newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames != ["text", "label"]:
            raise DataError(f"{path}: expected the columns text,label, found {reader.fieldnames}.")
        for number, row in enumerate(reader, start=2):
            where = f"{path}:{number}"
            try:
                label = int(row["label"])
            except (TypeError, ValueError) as error:
                raise DataError(f"{where}: label {row['label']!r} is not an integer 0, 1 or 2.") from error
            if not row["text"].strip():
                raise DataError(f"{where}: empty text. Fix or drop the row.")
            rows.append({"text": row["text"], "label": _check_label(label, labels, where), "lang": "en"})
    return rows


_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _read_sharegpt_preferences(path: Path, language: str) -> list[dict]:
    rows = []
    for index, row in enumerate(json.loads(read_text(path)[0])):
        where = f"{path}[{index}]"
        _require(row, {"conversations": list, "chosen": dict, "rejected": dict}, where)
        messages = []
        for turn in row["conversations"]:
            _require(turn, {"from": str, "value": str}, where)
            if turn["from"] not in _ROLES:
                raise DataError(f"{where}: unknown speaker {turn['from']!r}; expected one of {', '.join(_ROLES)}.")
            messages.append({"role": _ROLES[turn["from"]], "content": turn["value"]})
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: the conversation must end with a human turn, which chosen/rejected answer.")
        for answer in ("chosen", "rejected"):
            _require(row[answer], {"value": str}, f"{where}.{answer}")
        rows.append({"messages": messages, "chosen": row["chosen"]["value"], "rejected": row["rejected"]["value"],
                     "lang": language})  # fmt: skip
    return rows


def _read_public(name: str, split: str, download: bool | None) -> list[dict]:
    path = public_file(name, split, download)
    language = catalogue()[name]["language"]
    if name == "fin_tweets":
        return _read_fin_tweets(path)
    if name.startswith("alpaca"):
        rows = []
        for index, row in enumerate(json.loads(read_text(path)[0])):
            _require(row, {"instruction": str, "input": str, "output": str}, f"{path}[{index}]")
            rows.append({"instruction": row["instruction"], "input": row["input"], "output": row["output"],
                         "lang": language})  # fmt: skip
        return rows
    if name.startswith("dpo"):
        return _read_sharegpt_preferences(path, language)
    if name == "tinyshakespeare":
        return [{"text": read_text(path)[0], "lang": language}]
    poems = []
    for index, poem in enumerate(json.loads(read_text(path)[0])):
        _require(poem, {"title": str, "author": str, "paragraphs": list}, f"{path}[{index}]")
        poems.append({"title": poem["title"], "author": poem["author"], "text": "\n".join(poem["paragraphs"]),
                      "lang": language})  # fmt: skip
    return poems


def load(
    name: str,
    split: str = "train",
    *,
    languages: tuple[str, ...] | None = None,
    limit: int | None = None,
    download: bool | None = None,
) -> list[dict]:
    """Rows of a data set by name (see :func:`dataset_names`), as plain dicts in the task's schema.

    ``languages`` keeps rows of those languages (``("en",)``); ``limit`` keeps the first rows, for smoke runs.
    """
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    _entry(name)  # an unknown name is refused here, with the closest known names
    if name in TEACHING_SETS:
        rows = _split_teaching(_teaching_rows(name, project_data_dir() / TEACHING_SETS[name]["file"]), split)
    else:
        rows = _read_public(name, split, download)
    if languages is not None:
        rows = [row for row in rows if row["lang"] in languages]
    return rows[:limit] if limit is not None else rows


def _entry(name: str) -> dict:
    if name in TEACHING_SETS:
        return TEACHING_SETS[name]
    if name in catalogue():
        return catalogue()[name]
    close = difflib.get_close_matches(str(name), dataset_names(), n=2, cutoff=0.4)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise DataError(f"Unknown data set {name!r}.{hint} Known: {', '.join(dataset_names())}.")


def task_of(name: str) -> str:
    """The task a data set serves: classification, instruction, preference or text."""
    return _entry(name)["task"]


def label_names(name: str) -> tuple[str, ...]:
    """The names of a classification set's labels, in the order its integer labels index them (0, 1, ...).

    They come from the set's own entry (``TEACHING_SETS`` or ``data/catalogue.json``), which follows the file's
    card: ``fin_tweets`` is 0 = bearish, 1 = bullish, 2 = neutral. A learner's own file gets its names from
    :func:`read_labelled`.
    """
    entry = _entry(name)
    if entry["task"] != "classification":
        article = "an" if entry["task"][0] in "aeiou" else "a"
        raise DataError(f"{name} is {article} {entry['task']} data set; only classification sets have label names.")
    return tuple(entry["labels"])


# ----------------------------------------------------------------------------------------------------------------
# A learner's own labelled file, and a split of it
# ----------------------------------------------------------------------------------------------------------------
FORMATS = ("csv", "tsv", "jsonl", "at")  # "at": one "text@label" per line
#: Tried in this order; the first that decodes the whole file wins (and read_labelled says which).
ENCODINGS = ("utf-8", "utf-8-sig", "gb18030", "cp1252")


@dataclass
class LabelledSet:
    """Rows ``{"text", "label"}`` with integer labels, the label names they index, and how the file was read."""

    rows: list[dict]
    labels: tuple[str, ...]
    encoding: str


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    guessed = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl", "txt": "at"}.get(suffix)
    if guessed is None:
        raise DataError(f"{path}: cannot tell the format from {path.suffix!r}: pass fmt= one of {', '.join(FORMATS)}.")
    return guessed


def read_labelled(path: str | Path, text: str = "text", label: str = "label", labels: tuple[str, ...] | None = None,
                  fmt: str | None = None) -> LabelledSet:  # fmt: skip
    """Read a labelled text file of your own: CSV, TSV, JSON lines, or ``text@label`` lines (the format from the
    suffix unless ``fmt`` says). ``text`` and ``label`` name the columns (fields). The label names come from the data
    (sorted) unless ``labels`` gives them, in which case a row with another label is refused, naming its line.
    Encodings are tried in :data:`ENCODINGS` order and the one used is reported in the result."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is not a file.")
    fmt = _format_of(path, fmt)
    content, encoding = read_text(path, ENCODINGS)
    raw: list[tuple[str, str, str]] = []  # (where, text, label name)
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="," if fmt == "csv" else "\t")
        missing = [column for column in (text, label) if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r}; the columns are {reader.fieldnames}: pass text= and "
                            "label= naming yours.")  # fmt: skip
        raw = [(f"{path}:{number}", row[text] or "", (row[label] or "").strip())
               for number, row in enumerate(reader, start=2)]  # fmt: skip
    else:
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            if fmt == "at":
                if "@" not in line:
                    raise DataError(f"{where}: expected 'text@label', found no '@'. Fix or drop the line.")
                body, name = line.rsplit("@", 1)
                raw.append((where, body, name.strip()))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg}). Fix or drop the line.") from error
            _require(row, {text: str}, where)
            if label not in row or isinstance(row[label], bool):
                raise DataError(f"{where}: no usable field {label!r} (got {row.get(label)!r}). Fix or drop the row.")
            raw.append((where, row[text], str(row[label]).strip()))
    if not raw:
        raise DataError(f"{path} holds no rows.")
    names = tuple(labels) if labels is not None else tuple(sorted({name for _, _, name in raw}))
    index = {name: i for i, name in enumerate(names)}
    rows = []
    for where, body, name in raw:
        if not body.strip():
            raise DataError(f"{where}: empty text. Fix or drop the row.")
        if name not in index:
            raise DataError(f"{where}: label {name!r} is not one of {', '.join(names)}. Fix the row or the labels.")
        rows.append({"text": body, "label": index[name]})
    return LabelledSet(rows=rows, labels=names, encoding=encoding)


def split(rows: list[dict], validation: float = 0.1, test: float = 0.1, seed: int = 0,
          stratify: str | None = "label") -> dict[str, list[dict]]:  # fmt: skip
    """Train, validation and test splits of ``rows`` (shares of each), shuffled with ``seed``; with ``stratify``
    every split keeps each class's share (per value of that field), each class giving at least one row to a split
    whose share is above zero when it has rows enough."""
    for name, share in (("validation", validation), ("test", test)):
        if not 0 <= share < 1:
            raise DataError(f"{name} must be a share in [0, 1), got {share!r}.")
    if validation + test >= 1:
        raise DataError(f"validation + test = {validation + test} leaves no training rows: lower them.")
    if not rows:
        raise DataError("split got no rows: the data set is empty.")
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[stratify] if stratify else None, []).append(row)
    generator = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for key in sorted(groups, key=repr):
        members = list(groups[key])
        generator.shuffle(members)
        n_test = round(len(members) * test) or (1 if test and len(members) >= 3 else 0)
        n_validation = round(len(members) * validation) or (1 if validation and len(members) >= 3 else 0)
        splits["test"] += members[:n_test]
        splits["validation"] += members[n_test : n_test + n_validation]
        splits["train"] += members[n_test + n_validation :]
    for part in splits.values():
        generator.shuffle(part)
    return splits


def balanced_sample(rows: list[dict], per_class: int, seed: int = 0, field: str = "label") -> list[dict]:
    """``per_class`` rows of each value of ``field``, drawn with ``seed`` and shuffled together: a few-shot
    training set in which no class dominates, or a validation set on which answering one class scores 1/C."""
    if per_class < 1:
        raise DataError(f"per_class must be at least 1, got {per_class}.")
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[field], []).append(row)
    if not groups:
        raise DataError("balanced_sample got no rows: the data set is empty.")
    if short := {key: len(members) for key, members in groups.items() if len(members) < per_class}:
        raise DataError(f"Too few rows for {per_class} per class: {short} ({field}: count). Lower per_class.")
    generator = random.Random(seed)
    sample = [row for key in sorted(groups, key=repr) for row in generator.sample(groups[key], per_class)]
    generator.shuffle(sample)
    return sample


# ----------------------------------------------------------------------------------------------------------------
# Formatting and label masking
# ----------------------------------------------------------------------------------------------------------------
def instruction_messages(row: dict) -> list[dict]:
    """An Alpaca row as chat messages: the instruction (and input, after a blank line) is the user's turn."""
    user = row["instruction"] if not row["input"] else f"{row['instruction']}\n\n{row['input']}"
    return [{"role": "user", "content": user}]


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The prompt a chat model sees before it answers: the chat template with the assistant's header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompt_response(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of ``prompt + response + eos`` and labels that train on the response only.

    The labels copy the ids, with the prompt's positions set to ``IGNORE_INDEX`` (-100), so that the loss
    ``-Σ log p(response_t | prompt, response_<t)`` counts the answer and never the question. Prompt and response
    are tokenised apart so that the boundary is exact. An example longer than ``max_length`` is refused, never cut:
    cutting would drop the end of the answer and its EOS, and the model would learn answers that never stop.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        raise DataError(
            f"The example is {len(prompt_ids)} prompt + {len(response_ids)} answer tokens (with the EOS), over "
            f"max_length={max_length}; cutting it would cut the answer and its end. Raise max_length, or shorten or "
            "drop the example."
        )
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_instruction(tokenizer, row: dict, max_length: int = 256) -> dict[str, list[int]]:
    """An Alpaca row through the chat template, with the prompt masked out of the labels."""
    return tokenize_prompt_response(tokenizer, prompt_text(tokenizer, instruction_messages(row)), row["output"],
                                    max_length)  # fmt: skip


def _conversation_spans(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The conversation's token ids through the chat template, and each assistant answer's ``(start, end, turn_end)``.

    An answer starts after the conversation before it with the assistant's header (``add_generation_prompt``) and
    ends with its end of turn, the tokenizer's EOS (what the model must learn to emit to stop): ``[start, end)`` is
    trained; the template's glue after it (a newline) runs to ``turn_end`` and is not. This needs only a template
    that renders a conversation's start the same way whatever follows (prefix-preserving), not the ``{% generation
    %}`` markers that ``return_assistant_tokens_mask`` needs.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{type(tokenizer).__name__} has no chat template: use an instruction-tuned tokenizer, or set "
            "tokenizer.chat_template before formatting conversations."
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages
    ):
        raise DataError(f"A conversation is a list of {{'role', 'content'}} turns; got {messages!r:.200}")
    answers = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if not answers:
        raise DataError(f"The conversation has no assistant turn, so nothing would be trained: {messages!r:.200}")
    if any(not str(messages[index]["content"]).strip() for index in answers):
        raise DataError(f"An assistant turn is empty: nothing to train there. {messages!r:.200}")

    def ids(turns: list[dict], **kwargs) -> list[int]:
        return list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    full = ids(messages)
    spans = []
    for index in answers:
        prompt, through = ids(messages[:index], add_generation_prompt=True), ids(messages[: index + 1])
        if through[: len(prompt)] != prompt or full[: len(through)] != through:
            raise DataError(
                "The chat template renders the start of a conversation differently when more follows (it is not "
                "prefix-preserving), so the answers cannot be found by their position."
            )
        answer = through[len(prompt) :]
        eos = tokenizer.eos_token_id
        trained = len(answer) - answer[::-1].index(eos) if eos in answer else len(answer)
        spans.append((len(prompt), len(prompt) + trained, len(through)))
    return full, spans


def _trained(ids: list[int], spans: list[tuple[int, int]], max_length: int | None) -> dict[str, list[int]]:
    if max_length is not None and len(ids) > max_length:
        raise DataError(
            f"The conversation is {len(ids)} tokens, over max_length={max_length}, and cutting it would cut an "
            "answer or its end of turn: raise max_length, or shorten or split the conversation."
        )
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> dict[str, list[int]]:
    """One sample per conversation, every assistant answer trained (Q1 A1 Q2 A2 ...: A1 and A2 in the loss).

    Labels are the ids on each answer and its end of turn, ``IGNORE_INDEX`` elsewhere (system and user turns, the
    assistant's headers). A conversation longer than ``max_length`` is refused, never cut.
    """
    ids, spans = _conversation_spans(tokenizer, messages)
    return _trained(ids, [(start, end) for start, end, _ in spans], max_length)


def tokenize_conversation_per_turn(tokenizer, messages: list[dict], max_length: int | None = None) -> list[dict]:
    """One sample per assistant turn: Q1 A1, then Q1 A1 Q2 A2, ..., each training only its last answer.

    The earlier answers are context there. For T answers this costs about T/2 times the tokens of
    :func:`tokenize_conversation`, whose one causal sample trains every answer at once on the same context.
    """
    ids, spans = _conversation_spans(tokenizer, messages)
    return [_trained(ids[:turn_end], [(start, end)], max_length) for start, end, turn_end in spans]


def tokenize_classification(tokenizer, rows: list[dict], max_length: int = 64) -> list[dict]:
    """Encoder inputs for ``{"text", "label"}`` rows: ids, attention mask and the class index."""
    encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": row["label"]}
        for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], rows, strict=True)
    ]


@dataclass
class PadCollator:
    """Pads a list of tokenised examples into one batch of tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, and sequence ``labels`` with -100
    (so padding never enters the loss); scalar labels (classification) become a 1-D tensor.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key in features[0]:
            values = [feature[key] for feature in features]
            if isinstance(values[0], list):
                values = [value + [pad_values[key]] * (width - len(value)) for value in values]
            batch[key] = torch.tensor(values)
        return batch


def make_loader(features: list[dict], tokenizer, batch_size: int, shuffle: bool = False, seed: int = 0):
    """A DataLoader over tokenised examples with :class:`PadCollator` (seeded shuffling)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        features, batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=PadCollator(pad_token_id=tokenizer.pad_token_id),
    )  # fmt: skip
