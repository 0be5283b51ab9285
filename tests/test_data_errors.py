"""Every bad data file gives one clear error naming file, line and field; the CLI
exits non-zero with that line and no traceback, and touches no existing output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.data import load_classification, load_completions
from fedtune.errors import DataError

BAD = Path(__file__).parent / "data" / "bad"
LABELS = ["pos", "neg"]

# file -> (line, field, words the message must contain)
CLASSIFICATION_CASES = {
    "empty.jsonl": (None, None, "no examples"),
    "blank_lines.jsonl": (None, None, "no examples"),
    "bad_json.jsonl": (2, None, "bad JSON"),
    "not_object.jsonl": (1, None, "expected a JSON object"),
    "missing_text.jsonl": (3, "text", "missing"),
    "missing_label.jsonl": (1, "label", "missing"),
    "null_text.jsonl": (1, "text", "missing"),
    "empty_text.jsonl": (2, "text", "empty text"),
    "nonstring_text.jsonl": (1, "text", "expected a string"),
    "unknown_label.jsonl": (2, "label", "not in the coordinator's label set"),
    "list_label.jsonl": (1, "label", "expected a string label"),
    "missing_column.csv": (2, "label", "missing"),
    "empty_cell.csv": (3, "text", "empty text"),
    "extra_cells.csv": (2, None, "more cells than header columns"),
    "header_only.csv": (None, None, "no examples"),
    "not_utf8.jsonl": (None, None, "not valid UTF-8"),
    "notes.txt": (None, None, "unsupported file type"),
    "does_not_exist.jsonl": (None, None, "file not found"),
}
COMPLETION_CASES = {
    "missing_completion.jsonl": (2, "completion", "missing"),
    "empty_prompt.jsonl": (1, "prompt", "empty text"),
}


def _expected_prefix(name: str, line: int | None, field: str | None) -> str:
    prefix = str(BAD / name) + (f":{line}" if line else "") + ":"
    return prefix + (f" field '{field}':" if field else "")


@pytest.mark.parametrize("name", sorted(CLASSIFICATION_CASES))
def test_classification_file_errors(name: str) -> None:
    line, field, words = CLASSIFICATION_CASES[name]
    with pytest.raises(DataError) as info:
        load_classification(BAD / name, "text", "label", LABELS)
    err = info.value
    assert (err.line, err.field) == (line, field)
    assert str(err).startswith(_expected_prefix(name, line, field))
    assert words in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize("name", sorted(COMPLETION_CASES))
def test_completion_file_errors(name: str) -> None:
    line, field, words = COMPLETION_CASES[name]
    with pytest.raises(DataError) as info:
        load_completions(BAD / name, "prompt", "completion")
    assert (info.value.line, info.value.field) == (line, field)
    assert str(info.value).startswith(_expected_prefix(name, line, field))
    assert words in str(info.value)


def _fedtune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize("name", ["bad_json.jsonl", "missing_text.jsonl", "unknown_label.jsonl", "empty_cell.csv"])
def test_cli_check_data_one_line_error(name: str, tmp_path: Path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text('["pos", "neg"]')
    proc = _fedtune("check-data", str(BAD / name), "--set", f"labels-file={labels}")
    line, field, words = CLASSIFICATION_CASES[name]
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedtune: error: " + _expected_prefix(name, line, field))
    assert words in lines[0]


def test_cli_check_data_accepts_good_file(sentiment_data: dict[str, Path]) -> None:
    proc = _fedtune("check-data", str(sentiment_data["train"]), "--set", f"labels-file={sentiment_data['labels']}")
    assert proc.returncode == 0, proc.stderr
    assert "OK, 240 examples, 2 of 2 labels present" in proc.stdout


def test_cli_simulate_bad_data_fails_early_and_keeps_existing_run(
    tmp_path: Path, sentiment_data: dict[str, Path]
) -> None:
    runs = tmp_path / "runs"
    existing = runs / "earlier"
    existing.mkdir(parents=True)
    (existing / "metrics.jsonl").write_text('{"round": 1}\n')
    before = (existing / "metrics.jsonl").read_bytes()
    # A bad data file: one line, exit 1, Ray never starts.
    proc = _fedtune(
        "simulate",
        "--sites",
        "2",
        "--data",
        str(BAD / "unknown_label.jsonl"),
        "--set",
        f"labels-file={sentiment_data['labels']}",
        "--output-dir",
        str(runs),
        "--run-name",
        "new",
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"fedtune: error: {BAD / 'unknown_label.jsonl'}:2: field 'label': label 'maybe' is not in the "
        "coordinator's label set (2 labels)"
    ]
    assert not (runs / "new").exists()
    # Reusing an existing run's name is refused, and the earlier run is untouched.
    proc = _fedtune(
        "simulate",
        "--sites",
        "2",
        "--data",
        str(sentiment_data["train"]),
        "--set",
        f"labels-file={sentiment_data['labels']}",
        "--set",
        f"central-eval-path={sentiment_data['test']}",
        "--output-dir",
        str(runs),
        "--run-name",
        "earlier",
    )
    assert proc.returncode == 1
    assert "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert (existing / "metrics.jsonl").read_bytes() == before


def test_cli_bad_config_value() -> None:
    proc = _fedtune("check-data", str(BAD / "empty.jsonl"), "--set", "lora-r=zero")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "fedtune: error: config 'lora-r': expected int, got 'zero'"
