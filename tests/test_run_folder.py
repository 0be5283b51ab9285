"""The run folder's typed records (fedtune/run_folder.py): what the recorder writes is what
the readers get back, older runs' records still read, and a damaged file is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.run_folder import (
    METRICS_FILE,
    RUN_FILE,
    RoundRecord,
    RunRecord,
    Summary,
    read_finished_run,
    read_json_file,
    read_rounds,
    read_run,
    read_summary,
)
from fedtune.server.privacy_budget import resume_refusal
from fedtune.server.run_dir import RunDir


def test_round_records_written_by_the_run_dir_read_back_equal(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path).create()
    trained = RoundRecord(
        round=1,
        sites={"bank-a": {"node_id": 7, "train_loss": 0.5}},
        aggregate={"val_accuracy": 0.75},
        central={"accuracy": 0.8},
        dp_epsilon_max=1.5,
        dp_epsilon_next_max=2.1,
        bytes_up=100,
        bytes_down=200,
        round_seconds=3.25,
    )
    skipped = RoundRecord(round=2, skipped=True, failure_reasons=["node 3: refused"])
    run_dir.append_round(trained)
    run_dir.append_round(skipped)
    assert run_dir.read_rounds() == [trained, skipped]
    lines = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert "skipped" not in lines[0] and lines[1]["skipped"] is True
    assert lines[1]["central"] is None and "bytes_up" not in lines[1]  # absent costs are left out


def test_an_older_record_reads_with_the_fields_defaults_and_unknown_keys_are_ignored(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text(json.dumps({"round": 4, "sites": {}, "later_key": 1}) + "\n")
    (record,) = read_rounds(tmp_path)
    assert record.round == 4 and record.failures == 0 and record.dp_epsilon_next_max is None
    # The budget check a resume runs reads the typed field, and no epsilon means no refusal.
    assert resume_refusal(tmp_path, [record], dp=True, budget=1.0) is None
    ahead = RoundRecord(round=4, dp_epsilon_next_max=1.2)
    assert "after round 4" in (resume_refusal(tmp_path, [ahead], dp=True, budget=1.0) or "")


def test_run_record_and_summary_round_trip(tmp_path: Path) -> None:
    run = RunRecord(settings={"lora-r": 8}, labels=["a", "b"], run_id="r1", run_uid="u" * 32, base_model="m")
    (tmp_path / RUN_FILE).write_text(json.dumps(run.to_json()))
    assert read_run(tmp_path) == run
    assert "settings" not in run.metadata() and run.metadata()["run_uid"] == "u" * 32
    assert read_summary(tmp_path) is None
    summary = Summary(run_id="r1", run_dir=str(tmp_path), rounds=2, central={"accuracy": 0.5}, seconds=1.0)
    (tmp_path / "summary.json").write_text(json.dumps(summary.to_json()))
    assert read_summary(tmp_path) == summary


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (METRICS_FILE, '{"round": 1}\n{"round": 2,\n', "metrics.jsonl:2: bad JSON"),
        (METRICS_FILE, '{"sites": {}}\n', "metrics.jsonl:1: "),  # the round number is required
        (METRICS_FILE, "[1, 2]\n", "metrics.jsonl:1: expected a JSON object"),
        (RUN_FILE, "{", "run.json:1: bad JSON"),
        (RUN_FILE, '{"labels": []}', "run.json: "),  # settings required
    ],
)
def test_a_damaged_run_file_is_one_line_naming_it(tmp_path: Path, name: str, text: str, expected: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(FedtuneError) as err:
        read_rounds(tmp_path) if name == METRICS_FILE else read_run(tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_json_file_that_is_not_text_is_one_line_naming_it(tmp_path: Path) -> None:
    """budget.json, secagg.json and the rest: bytes that are not UTF-8, or a folder in the
    file's place, are refused in one line like bad JSON."""
    damaged = tmp_path / "budget.json"
    damaged.write_bytes(b'{"num_rounds": \xff}')
    with pytest.raises(FedtuneError, match=r"budget.json: unreadable") as err:
        read_json_file(damaged)
    assert "\n" not in str(err.value)
    (tmp_path / "secagg.json").mkdir()
    with pytest.raises(FedtuneError, match=r"secagg.json: unreadable"):
        read_json_file(tmp_path / "secagg.json")


def test_a_folder_that_is_not_a_finished_run_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / RUN_FILE).write_text(json.dumps(RunRecord(settings={}, labels=[]).to_json()))
    with pytest.raises(FedtuneError, match=r"metrics.jsonl: missing; is .* a finished fedtune run folder"):
        read_finished_run(tmp_path)
