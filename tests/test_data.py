import hashlib
import json
import re
import shutil
from collections import Counter

import pytest

from peftlab import data, models

REPO_DATA = data.project_data_dir()


# -- the teaching sets --------------------------------------------------------------------------------------------
def all_rows(name):
    return data.load(name, "train") + data.load(name, "validation")


def test_headlines_are_balanced_in_both_languages():
    rows = all_rows("fin_headlines")
    assert len(rows) >= 300
    per_language = Counter((row["lang"], row["label"]) for row in rows)
    for lang in ("en", "zh"):
        counts = [per_language[(lang, label)] for label in range(3)]
        assert min(counts) >= 50 and max(counts) - min(counts) <= 0.1 * max(counts), (lang, counts)


def test_instruction_and_preference_sets_have_both_languages():
    instructions = Counter(row["lang"] for row in all_rows("instructions"))
    preferences = Counter(row["lang"] for row in all_rows("preferences"))
    assert instructions["en"] >= 100 and instructions["zh"] >= 100
    assert preferences["en"] >= 60 and preferences["zh"] >= 60
    for row in all_rows("preferences"):
        assert row["chosen"] != row["rejected"] and row["messages"][-1]["role"] == "user"


@pytest.mark.parametrize("name", list(data.TEACHING_SETS))
def test_teaching_splits_are_disjoint_and_cover_every_row(name):
    train_ids = [row["id"] for row in data.load(name, "train")]
    validation_ids = [row["id"] for row in data.load(name, "validation")]
    assert not set(train_ids) & set(validation_ids)
    assert len(train_ids) + len(validation_ids) == len(set(train_ids) | set(validation_ids))
    assert 0.15 <= len(validation_ids) / (len(train_ids) + len(validation_ids)) <= 0.25


def test_no_duplicate_texts_in_the_headlines():
    texts = [row["text"].strip().lower() for row in all_rows("fin_headlines")]
    assert len(texts) == len(set(texts))


def test_datasheet_checksums_match_the_files():
    sheet = (REPO_DATA / "DATASHEET.md").read_text(encoding="utf-8")
    for spec in data.TEACHING_SETS.values():
        digest = hashlib.md5((REPO_DATA / spec["file"]).read_bytes()).hexdigest()
        assert re.search(rf"{re.escape(spec['file'])}.*{digest}", sheet), f"{spec['file']}: md5 {digest} not in sheet"


def test_languages_and_limit_filter_rows():
    rows = data.load("fin_headlines", languages=("zh",), limit=5)
    assert len(rows) == 5 and {row["lang"] for row in rows} == {"zh"}


# -- the public sets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(data.catalogue()))
def test_public_sets_load_with_catalogued_rows(public_data_dir, name):
    entry = data.catalogue()[name]
    for split, spec in entry["splits"].items():
        rows = data.load(name, split)
        expected = 1 if name == "tinyshakespeare" else spec["rows"]
        assert len(rows) == expected
        assert data.task_of(name) == entry["task"]


def test_public_rows_share_the_teaching_schema(public_data_dir):
    tweet = data.load("fin_tweets", "validation", limit=1)[0]
    assert set(tweet) >= {"text", "label"} and tweet["label"] in (0, 1, 2)
    pair = data.load("dpo_zh_demo", limit=1)[0]
    assert set(pair) >= {"messages", "chosen", "rejected"}
    assert {m["role"] for m in pair["messages"]} <= {"system", "user", "assistant"}
    poem = data.load("tang_poems", limit=1)[0]
    assert poem["title"] and "\n" in poem["text"]
    assert len(data.load("tinyshakespeare")[0]["text"]) == 1_115_394


def test_a_damaged_file_fails_its_checksum(public_data_dir, tmp_path, monkeypatch):
    shutil.copytree(public_data_dir / "fin_tweets", tmp_path / "fin_tweets")
    with open(tmp_path / "fin_tweets" / "sent_valid.csv", "a", encoding="utf-8") as file:
        file.write("one more row,1\n")
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DataError, match=r"has md5 .* but the catalogue expects 609440cc"):
        data.load("fin_tweets", "validation")


def test_download_fetches_checks_and_caches(no_public_data, monkeypatch):
    """The download path, without a network: the catalogue's URL points at a local file."""
    source = no_public_data / "remote.csv"
    source.write_text("text,label\nShares jump,1\n", encoding="utf-8")
    entry = {
        "fin_tweets": {
            **data.catalogue()["fin_tweets"],
            "splits": {
                "validation": {
                    "path": "fin_tweets/sent_valid.csv",
                    "url": source.as_uri(),
                    "md5": data.md5_of(source),
                    "rows": 1,
                }
            },
        }
    }
    monkeypatch.setattr(data, "catalogue", lambda: entry)
    with pytest.raises(data.DataError, match=r"(?s)PEFTLAB_DATA_DIR is not set.*download=True"):
        data.load("fin_tweets", "validation")
    assert data.load("fin_tweets", "validation", download=True) == [{"text": "Shares jump", "label": 1, "lang": "en"}]
    assert (models.home_dir() / "data" / "fin_tweets" / "sent_valid.csv").exists()
    assert len(data.load("fin_tweets", "validation")) == 1  # now cached: no download needed


def test_a_download_with_the_wrong_checksum_leaves_nothing(no_public_data, monkeypatch):
    source = no_public_data / "remote.csv"
    source.write_text("text,label\nx,1\n", encoding="utf-8")
    entry = {
        "fin_tweets": {
            **data.catalogue()["fin_tweets"],
            "splits": {
                "train": {"path": "fin_tweets/sent_train.csv", "url": source.as_uri(), "md5": "0" * 32, "rows": 1}
            },
        }
    }
    monkeypatch.setattr(data, "catalogue", lambda: entry)
    with pytest.raises(data.DataError, match="damaged or another version"):
        data.load("fin_tweets", download=True)
    assert not (models.home_dir() / "data" / "fin_tweets" / "sent_train.csv").exists()


# -- bad input ----------------------------------------------------------------------------------------------------
def test_unknown_data_set_suggests_a_name():
    with pytest.raises(data.DataError, match=r"Unknown data set 'fin_tweet'.*Did you mean 'fin_tweets'"):
        data.load("fin_tweet")


def test_unknown_split_lists_the_splits():
    with pytest.raises(data.DataError, match="Unknown split 'test'"):
        data.load("fin_headlines", "test")


def test_missing_data_folder_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match=r"PEFTLAB_DATA_DIR='.*nowhere' is not a folder"):
        data.load("fin_tweets")


def test_missing_public_file_says_how_to_get_it(no_public_data):
    with pytest.raises(data.DataError, match=r"(?s)needs fin_tweets/sent_train.csv.*PEFTLAB_DATA_DIR.*download=True"):
        data.load("fin_tweets")


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"id": "en-1", "lang": "en", "text": "x"', "not valid JSON"),
     ('{"id": "en-1", "lang": "en", "label": 1}', "field 'text' is missing"),
     ('{"id": "en-1", "lang": "en", "text": "x", "label": "1"}', "field 'label' should be int"),
     ('{"id": "en-1", "lang": "en", "text": "x", "label": 7}', r"label 7 is out of range 0\.\.2"),
     ('["not", "an", "object"]', "expected an object")],
)  # fmt: skip
def test_malformed_teaching_rows_name_the_file_and_line(tmp_path, monkeypatch, line, message):
    good = json.dumps({"id": "en-0", "lang": "en", "text": "fine", "label": 0})
    (tmp_path / "fin_headlines.jsonl").write_text(f"{good}\n{line}\n", encoding="utf-8")
    shutil.copy(REPO_DATA / "catalogue.json", tmp_path)
    monkeypatch.setattr(data, "project_data_dir", lambda: tmp_path)
    with pytest.raises(data.DataError, match=rf"fin_headlines.jsonl:2: .*{message}"):
        data.load("fin_headlines")


def test_malformed_csv_label_names_the_line(public_data_dir, tmp_path, monkeypatch):
    (tmp_path / "bad.csv").write_text("text,label\nok,1\nbad,positive\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"bad.csv:3: label 'positive' is not an integer"):
        data._read_fin_tweets(tmp_path / "bad.csv")


def test_label_names_come_from_each_sets_own_entry():
    # fin_tweets' card (SOURCES.md): 0 = Bearish, 1 = Bullish, 2 = Neutral.
    assert data.label_names("fin_tweets") == ("bearish", "bullish", "neutral")
    assert data.label_names("fin_headlines") == ("bearish", "bullish", "neutral")
    with pytest.raises(data.DataError, match="alpaca_en_demo is an instruction data set; only classification"):
        data.label_names("alpaca_en_demo")
    with pytest.raises(data.DataError, match=r"Unknown data set 'fin_tweet'\. Did you mean 'fin_tweets'"):
        data.label_names("fin_tweet")


def test_a_label_outside_the_sets_own_names_is_refused(tmp_path, monkeypatch):
    (tmp_path / "two.csv").write_text("text,label\nup,1\nflat,2\n", encoding="utf-8")
    entries = {**data.catalogue(), "fin_tweets": {**data.catalogue()["fin_tweets"], "labels": ["down", "up"]}}
    monkeypatch.setattr(data, "catalogue", lambda: entries)
    with pytest.raises(data.DataError, match=r"two.csv:3: label 2 is out of range 0..1 \(down, up\)"):
        data._read_fin_tweets(tmp_path / "two.csv")


# -- formatting, masking, collating -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_tokenizer():
    return models.load_causal_lm()[1]


def test_label_masking_trains_on_the_answer_only(chat_tokenizer):
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    example = data.tokenize_instruction(chat_tokenizer, row)
    prompt = data.prompt_text(chat_tokenizer, data.instruction_messages(row))
    n_prompt = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert chat_tokenizer.decode(example["input_ids"][n_prompt:]) == "Bonjour" + chat_tokenizer.eos_token
    assert "Translate to French.\n\nGood morning" in prompt and prompt.rstrip().endswith("assistant")


def test_an_example_longer_than_max_length_is_refused_never_cut(chat_tokenizer):
    row = {"instruction": "Count.", "input": "", "output": " ".join(map(str, range(200)))}
    with pytest.raises(data.DataError, match=r"over max_length=48; cutting it would cut the answer"):
        data.tokenize_instruction(chat_tokenizer, row, max_length=48)
    whole = data.tokenize_instruction(chat_tokenizer, row, max_length=1024)
    assert whole["input_ids"][-1] == whole["labels"][-1] == chat_tokenizer.eos_token_id  # it ends with its EOS


def test_a_prompt_that_leaves_no_room_for_the_answer_is_refused(chat_tokenizer):
    row = {"instruction": "Count.", "input": "", "output": "1 2 3"}
    with pytest.raises(data.DataError, match=r"over max_length=16"):
        data.tokenize_instruction(chat_tokenizer, row, max_length=16)


def test_collator_pads_ids_masks_and_labels():
    collate = data.PadCollator(pad_token_id=9)
    batch = collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
                     {"input_ids": [4], "attention_mask": [1], "labels": [4]}])  # fmt: skip
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    scalar = collate([{"input_ids": [1], "attention_mask": [1], "labels": 2}])
    assert scalar["labels"].tolist() == [2]


def test_classification_features_and_loader():
    _, tokenizer = models.load_encoder()
    rows = data.load("fin_headlines", languages=("en",), limit=10)
    features = data.tokenize_classification(tokenizer, rows, max_length=16)
    assert all(len(f["input_ids"]) <= 16 for f in features) and [f["labels"] for f in features] == [
        r["label"] for r in rows]  # fmt: skip
    batch = next(iter(data.make_loader(features, tokenizer, batch_size=4)))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)


# -- a learner's own file ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [("mine.csv", "text,label\nstocks soar,up\nshares slump,down\nflat day,flat\n", None),
     ("mine.tsv", "text\tlabel\nstocks soar\tup\nshares slump\tdown\nflat day\tflat\n", None),
     ("mine.jsonl", '{"text": "stocks soar", "label": "up"}\n{"text": "shares slump", "label": "down"}\n'
                    '{"text": "flat day", "label": "flat"}\n', None),
     ("mine.txt", "stocks soar@up\nshares slump@down\nflat day@flat\n", None)],
)  # fmt: skip
def test_a_labelled_file_reads_in_every_format_with_labels_from_the_data(tmp_path, name, content, fmt):
    (tmp_path / name).write_text(content, encoding="utf-8")
    read = data.read_labelled(tmp_path / name, fmt=fmt)
    assert read.labels == ("down", "flat", "up") and read.encoding == "utf-8"
    assert read.rows == [{"text": "stocks soar", "label": 2}, {"text": "shares slump", "label": 0},
                         {"text": "flat day", "label": 1}]  # fmt: skip


def test_the_encoding_fallback_says_which_it_used_and_bad_rows_name_their_line(tmp_path):
    (tmp_path / "zh.csv").write_bytes("text,label\n股价上涨,利好\n".encode("gb18030"))
    read = data.read_labelled(tmp_path / "zh.csv")
    assert read.encoding == "gb18030" and read.rows == [{"text": "股价上涨", "label": 0}] and read.labels == ("利好",)
    (tmp_path / "bad.csv").write_text("text,label\nfine,up\nodd,sideways\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"bad.csv:3: label 'sideways' is not one of up, down"):
        data.read_labelled(tmp_path / "bad.csv", labels=("up", "down"))
    (tmp_path / "empty.txt").write_text("  @up\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"empty.txt:1: empty text"):
        data.read_labelled(tmp_path / "empty.txt")
    with pytest.raises(data.DataError, match=r"no column 'sentence'; the columns are \['text', 'label'\]"):
        data.read_labelled(tmp_path / "bad.csv", text="sentence")
    (tmp_path / "what.xlsx").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"cannot tell the format from .\.xlsx."):
        data.read_labelled(tmp_path / "what.xlsx")


def test_a_non_utf8_teaching_file_names_the_line(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(data.DataError, match=r"x.jsonl:2: byte b'\\xff' is not UTF-8"):
        data._read_jsonl(tmp_path / "x.jsonl")


def test_split_is_stratified_seeded_and_covers_every_row():
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(90)]
    parts = data.split(rows, validation=0.1, test=0.2, seed=1)
    assert sorted(len(part) for part in parts.values()) == [9, 18, 63]
    assert sorted(r["text"] for part in parts.values() for r in part) == sorted(r["text"] for r in rows)
    for part in parts.values():
        assert Counter(r["label"] for r in part) == Counter({0: len(part) // 3, 1: len(part) // 3, 2: len(part) // 3})
    assert data.split(rows, seed=1) == data.split(rows, seed=1) != data.split(rows, seed=2)
    with pytest.raises(data.DataError, match="leaves no training rows"):
        data.split(rows, validation=0.5, test=0.5)
    with pytest.raises(data.DataError, match="split got no rows"):
        data.split([])


def test_balanced_sample_draws_per_class_rows_seeded_and_refuses_too_few():
    rows = [{"text": f"t{i}", "label": 0 if i < 70 else 1 + i % 2} for i in range(100)]  # 70, 15, 15
    sample = data.balanced_sample(rows, per_class=5, seed=3)
    assert Counter(r["label"] for r in sample) == Counter({0: 5, 1: 5, 2: 5})
    assert len({r["text"] for r in sample}) == 15 and all(r in rows for r in sample)
    assert [r["label"] for r in sample] != sorted(r["label"] for r in sample)  # shuffled, not class after class
    assert sample == data.balanced_sample(rows, per_class=5, seed=3) != data.balanced_sample(rows, 5, seed=4)
    with pytest.raises(data.DataError, match=r"Too few rows for 16 per class: \{1: 15, 2: 15\}"):
        data.balanced_sample(rows, per_class=16)
    with pytest.raises(data.DataError, match="per_class must be at least 1"):
        data.balanced_sample(rows, per_class=0)
    with pytest.raises(data.DataError, match="got no rows"):
        data.balanced_sample([], per_class=1)


def test_teaching_rows_with_empty_texts_or_boolean_labels_are_refused(tmp_path, monkeypatch):
    shutil.copy(REPO_DATA / "catalogue.json", tmp_path)
    monkeypatch.setattr(data, "project_data_dir", lambda: tmp_path)
    for line, message in [
        ('{"id": "en-1", "lang": "en", "text": "  ", "label": 1}', "field 'text' is empty"),
        ('{"id": "en-1", "lang": "en", "text": "x", "label": true}', "'label' should be int"),
    ]:
        (tmp_path / "fin_headlines.jsonl").write_text(line + "\n", encoding="utf-8")
        with pytest.raises(data.DataError, match=message):
            data.load("fin_headlines")


def test_a_damaged_download_is_fetched_again_and_an_offline_download_names_the_url(no_public_data, monkeypatch):
    source = no_public_data / "remote.csv"
    source.write_text("text,label\nShares jump,1\n", encoding="utf-8")
    spec = {"path": "fin_tweets/sent_valid.csv", "url": source.as_uri(), "md5": data.md5_of(source), "rows": 1}
    entry = {"fin_tweets": {**data.catalogue()["fin_tweets"], "splits": {"validation": spec}}}
    monkeypatch.setattr(data, "catalogue", lambda: entry)
    cached = models.home_dir() / "data" / "fin_tweets" / "sent_valid.csv"
    cached.parent.mkdir(parents=True)
    cached.write_text("damaged", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"damaged or another version\. download=True replaces it"):
        data.load("fin_tweets", "validation")
    assert len(data.load("fin_tweets", "validation", download=True)) == 1 and data.md5_of(cached) == spec["md5"]
    offline = {**spec, "url": "http://127.0.0.1:9/nothing.csv", "path": "fin_tweets/other.csv"}
    monkeypatch.setattr(data, "catalogue", lambda: {"fin_tweets": {**entry["fin_tweets"], "splits": {
        "validation": offline}}})  # fmt: skip
    with pytest.raises(data.DataError, match=r"Could not download http://127.0.0.1:9/nothing.csv .* put the"):
        data.load("fin_tweets", "validation", download=True)


def test_preference_rows_keep_the_flaw_of_the_rejected_answer():
    rows = data.load("preferences", "train") + data.load("preferences", "validation")
    assert len(rows) == 120 and {row["flaw"] for row in rows} >= {"unhelpful", "format", "rude"}
    assert all(row["messages"][-1]["role"] == "user" for row in rows)
