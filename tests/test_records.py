"""The records of full runs (notebooks/results/NN_full.json): what a record holds, that only a full run writes one,
that nothing is replaced without a word, and that the prose check can read what is written."""

import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from test_notebooks import quoted_figures  # the prose check's own reading of a record

from peftlab import env, records

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FULL = env.Run(profile="full", device=CPU, seed=0)
SMOKE = env.Run(profile="smoke", device=CPU, seed=0)
FIELDS = {"data": "fin_tweets", "steps": 900, "results": [{"method": "LoRA", "accuracy": 0.8689}]}


def test_a_record_is_named_by_its_notebook(tmp_path):
    assert records.record_path("01") == Path("results/01_full.json")
    assert records.record_path(8, tmp_path) == tmp_path / "08_full.json"
    for bad in ("1", "001", "ab", 100, -1, True, 1.0):
        with pytest.raises(ValueError, match="two-digit number"):
            records.record_path(bad)


def test_the_header_says_when_where_what_ran_and_from_which_seeds():
    record = records.full_run_record(FULL, FIELDS)
    assert list(record) == ["date", "device", "profile", "versions", "seeds", "data", "steps", "results"]
    assert record["date"] == date.today().isoformat()
    assert record["device"] == env.device_name(CPU) and record["profile"] == "full"
    assert record["versions"] == env.package_versions() and record["versions"]["torch"] == torch.__version__
    assert record["seeds"] == [0]
    assert records.full_run_record(env.Run("full", CPU, seed=3), FIELDS)["seeds"] == [3]
    assert records.full_run_record(FULL, FIELDS, seeds=[0, 1, 2])["seeds"] == [0, 1, 2]


def test_the_header_is_peftlabs_to_write():
    with pytest.raises(ValueError, match="device, profile are the record's header"):
        records.full_run_record(FULL, {"profile": "full", "device": "H100"})
    for seeds in ([], [0.5], [True]):
        with pytest.raises(ValueError, match="seeds must be the whole numbers"):
            records.full_run_record(FULL, FIELDS, seeds=seeds)
    with pytest.raises(TypeError, match=r"the Run that env\.setup"):
        records.full_run_record("full", FIELDS)


def test_a_full_run_record_is_written_as_json_and_read_back(tmp_path):
    fields = {**FIELDS, "freeze_sweep": [{"k": np.int64(3), "accuracy": np.float64(0.874)}], "peaks": None}
    path = records.write_full_run("01", FULL, fields, folder=tmp_path / "results")
    assert path == tmp_path / "results" / "01_full.json"  # the folder is made
    written = json.loads(path.read_text())
    assert written["freeze_sweep"] == [{"k": 3, "accuracy": 0.874}]  # NumPy scalars as plain numbers
    assert written["results"] == FIELDS["results"] and written["seeds"] == [0]
    assert records.read("01", tmp_path / "results") == written
    assert sorted(p.name for p in path.parent.iterdir()) == ["01_full.json"]  # no partial file left


def test_what_is_written_is_what_the_prose_check_reads(tmp_path):
    fields = {
        "results": [{"accuracy": 0.87149}],
        "freeze_sweep": [{"accuracy": 0.744}],
        "instruction_sweep": {"runs": [{"val_loss": 2.0449}]},
        "peaks": [{"measured peak GiB": 4.7461}],
    }
    path = records.write_full_run("08", FULL, fields, folder=tmp_path)
    assert quoted_figures(json.loads(path.read_text())) == ["0.871", "0.744", "2.045", "4.75"]


def test_a_smoke_run_records_nothing(tmp_path):
    with pytest.raises(ValueError, match="comes from the 'smoke' profile: only a full run's numbers are recorded"):
        records.write_full_run("01", SMOKE, FIELDS, folder=tmp_path)
    with pytest.raises(ValueError, match="'smoke' profile"):
        records.write({**records.full_run_record(FULL, FIELDS), "profile": "smoke"}, tmp_path / "01_full.json")
    assert list(tmp_path.iterdir()) == []


def test_a_record_without_its_header_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lacks its header \(date, versions, seeds\)"):
        records.write({"device": "H100", "profile": "full", **FIELDS}, tmp_path / "01_full.json")


def test_an_existing_record_is_kept_unless_replace_and_then_it_says_so(tmp_path, capsys):
    path = records.write_full_run("09", FULL, FIELDS, folder=tmp_path)
    old = json.loads(path.read_text())
    with pytest.raises(FileExistsError, match=rf"09_full.json exists \(the record of a run on {old['date']}, CPU"):
        records.write_full_run("09", FULL, {**FIELDS, "steps": 1}, folder=tmp_path)
    assert json.loads(path.read_text())["steps"] == 900
    records.write_full_run("09", FULL, {**FIELDS, "steps": 1}, folder=tmp_path, replace=True)
    assert json.loads(path.read_text())["steps"] == 1
    assert f"replacing {path} (the run on {old['date']}, CPU" in capsys.readouterr().out


def test_a_results_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="results is a file, not a folder for the results"):
        records.write_full_run("01", FULL, FIELDS, folder=tmp_path / "results")
    (tmp_path / "02_full.json").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder: a record is a file"):
        records.write_full_run("02", FULL, FIELDS, folder=tmp_path)


def test_values_json_cannot_hold_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"NaN or an infinity \(record\['results'\]\[0\]\['accuracy'\] = nan\)"):
        records.write_full_run("01", FULL, {"results": [{"accuracy": float("nan")}]}, folder=tmp_path)
    with pytest.raises(TypeError, match="got a device"):
        records.write_full_run("01", FULL, {"where": torch.device("cpu")}, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_reading_a_record_that_is_not_there_gives_none_and_a_bad_one_an_error(tmp_path):
    assert records.read("01", tmp_path) is None  # a notebook opened on its own (Colab) has no results folder
    (tmp_path / "01_full.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"01_full\.json is not valid JSON"):
        records.read("01", tmp_path)
    (tmp_path / "02_full.json").write_text(json.dumps({"profile": "smoke"}))
    with pytest.raises(ValueError, match=r"02_full\.json is not the record of a full run"):
        records.read("02", tmp_path)


@pytest.mark.parametrize("path", sorted((REPO / "notebooks" / "results").glob("*_full.json")), ids=lambda p: p.name)
def test_the_committed_records_read_back(path):
    record = records.read(path.name[:2], path.parent)
    assert record["profile"] == "full" and {"date", "device", "versions"} <= set(record)
    assert quoted_figures(record)  # something the prose quotes


def test_a_benchmark_run_is_appended_under_its_device_type_and_the_earlier_runs_are_kept(tmp_path):
    path = tmp_path / "results" / "bench.json"
    records.append_benchmark_run(path, "cpu", {"date": "2026-12-03", "rows": [1]})
    records.append_benchmark_run(path, "cuda", {"date": "2026-12-04", "rows": [2]})
    records.append_benchmark_run(path, "cpu", {"date": "2026-12-04", "rows": [3]})
    cpu_runs = [{"date": "2026-12-03", "rows": [1]}, {"date": "2026-12-04", "rows": [3]}]
    assert json.loads(path.read_text()) == {"cpu": cpu_runs, "cuda": [{"date": "2026-12-04", "rows": [2]}]}
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no partial file left behind
