"""The judged instructions: the answer key matches the data, and the rules mark what they say they mark."""

import json

import pytest

from peftlab import data, judge


def test_the_key_covers_seventy_items_and_every_reference_answer_is_correct():
    items = judge.items()
    assert len(items) == 70
    assert sum(item["lang"] == "en" for item in items) == sum(item["lang"] == "zh" for item in items) == 35
    for item in items:  # the data set's own reference answer passes its rule: the key agrees with the data
        assert judge.is_correct(item, item["output"]), item["id"]


@pytest.mark.parametrize(
    ("kind", "lang", "expected", "answer", "correct"),
    [
        ("label", "en", "bullish", "Bullish.", True),
        ("label", "en", "bullish", "This is bullish, not bearish.", False),
        ("label", "en", "bearish", "bearish, bullish, neutral", False),  # echoing the options
        ("label", "zh", "利空", "利空／利好／中性", False),
        ("label", "en", "bullish", "Bearish, though some say bullish.", False),
        ("label", "en", "bullish", "I cannot tell.", False),
        ("label", "zh", "利好", "这是利好消息。", True),
        ("label", "zh", "利好", "中性", False),
        ("numbers", "en", [30000, 20000], "Stocks $30,000 and bonds $20,000.00.", True),
        ("numbers", "en", [30000, 20000], "Stocks $30,000.", False),
        ("numbers", "zh", [5475], "一年能存5475元。", True),
        ("numbers", "en", [4], "The yield is 0.04, or 4%.", True),
        ("numbers", "en", [4], "The yield is 40%.", False),
        ("json", "en", {"item": "mug", "quantity": 3}, 'Here: {"item": "Mug ", "quantity": 3.0}', True),
        ("json", "en", {"item": "mug", "quantity": 3}, '{"item": "mug"}', False),
        ("json", "en", {"item": "mug", "quantity": 3}, '{"item": "mug", "quantity": "three"}', False),
        ("json", "en", {"item": "mug", "quantity": 3}, "item: mug, quantity: 3", False),
        ("json", "en", {"item": "mug", "quantity": 3}, '{"item": "mug", "quantity": 3} (a set: {1, 2})', True),
    ],
)
def test_the_rules(kind, lang, expected, answer, correct):
    assert judge.is_correct({"kind": kind, "lang": lang, "answer": expected}, answer) is correct


def test_score_by_language_and_kind():
    items = [{"kind": "numbers", "lang": "en", "answer": [2]}, {"kind": "numbers", "lang": "zh", "answer": [3]},
             {"kind": "label", "lang": "en", "answer": "neutral"}]  # fmt: skip
    assert judge.score(items, ["2", "4", "neutral"]) == {"all": 2 / 3, "en": 1.0, "zh": 0.0, "label": 1.0,
                                                         "numbers": 0.5}  # fmt: skip
    with pytest.raises(ValueError, match="one answer per item"):
        judge.score(items, ["2"])


def test_a_key_naming_an_unknown_row_is_refused(tmp_path, monkeypatch):
    for name in ("instructions.jsonl", "fin_headlines.jsonl", "preferences.jsonl"):
        (tmp_path / name).write_bytes((data.project_data_dir() / name).read_bytes())
    (tmp_path / "judged.jsonl").write_text(json.dumps({"id": "en-999", "kind": "label", "answer": "x"}) + "\n")
    monkeypatch.setattr(data, "project_data_dir", lambda: tmp_path)
    with pytest.raises(data.DataError, match=r"judged\.jsonl:1: unknown id"):
        judge.items()
