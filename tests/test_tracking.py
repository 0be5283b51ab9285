"""Watching a run while it runs: the coordinator's TensorBoard event files and MLflow run,
read back with TensorBoard's own reader and MLflow's client, hold after every round the
values metrics.jsonl holds; each site's own curves sit in its state folder and nowhere
else; the plots and report are rewritten whole after every round; a tracker that cannot
start refuses the run in one line, and one that fails mid-run does not stop it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedtune.cli.simulation import run_simulation
from fedtune.config import RunSettings, default_run_config
from fedtune.errors import ConfigError
from fedtune.run_folder import RoundRecord
from fedtune.server.round_scalars import round_scalars
from fedtune.server.tracking import RoundSink


def _simulate(tmp_path: Path, model: Path, data: dict[str, Path], **extra: Any) -> Path:
    config = {
        **default_run_config(),
        "model": str(model),
        "data-path": str(data["train"]),
        "labels-file": str(data["labels"]),
        "central-eval-path": str(data["test"]),
        "central-eval-every": 1,
        "output-dir": str(tmp_path / "runs"),
        "run-name": "t",
        "site-state-dir": str(tmp_path / "site-state"),
        "secagg": False,
        "num-rounds": 2,
        "local-steps": 4,
        "batch-size": 16,
        **extra,
    }
    run_simulation(config, num_sites=2)
    return tmp_path / "runs" / "t"


def _records(run_dir: Path) -> list[RoundRecord]:
    return [RoundRecord.from_json(json.loads(x)) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return events


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tensorboard_holds_every_round_and_sites_keep_their_own_curves(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    run_dir = _simulate(tmp_path, tiny_bert_dir, sentiment_data)  # tracking: the default
    records = _records(run_dir)
    assert [r.round for r in records] == [1, 2]
    events = _events(run_dir / "tensorboard")
    tags = set(events.Tags()["scalars"])
    for record in records:
        expected = round_scalars(record)
        assert {"global/val_accuracy", "central/accuracy", "traffic/bytes_up", "site/site-0/train_loss"} <= set(
            expected
        )
        for name, value in expected.items():
            assert name in tags, name
            logged = {e.step: e.value for e in events.Scalars(name)}
            assert logged[record.round] == pytest.approx(value, rel=1e-6), name
    # each site's own curves: in its state folder, a point per training step, not in the run folder
    site_events = sorted((tmp_path / "site-state").glob("*/tensorboard/site-*"))
    assert [p.name for p in site_events] == ["site-0", "site-1"]
    for folder in site_events:
        curves = _events(folder)
        losses = curves.Scalars("train/loss")
        assert [e.step for e in losses] == list(range(1, 9))  # 2 rounds x 4 steps, counted across rounds
        assert len(curves.Scalars("train/learning_rate")) == 8
        site = folder.name
        validation = {e.step: e.value for e in curves.Scalars("validation/accuracy")}
        assert validation == {r.round: pytest.approx(r.sites[site]["val_accuracy"]) for r in records}
    assert not any("train/learning_rate" in _events(run_dir / "tensorboard").Tags()["scalars"] for _ in [0])
    assert not list(run_dir.rglob("steps.json"))
    # the views of the last round, rewritten whole: no temporary file left behind
    assert (run_dir / "report.md").read_text().count("| 2 |") >= 1
    assert (run_dir / "accuracy.png").stat().st_size > 0 and not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_mlflow_run_holds_every_round_and_the_run_files(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = _simulate(tmp_path, tiny_bert_dir, sentiment_data, tracking="mlflow")
    saved = json.loads((run_dir / "mlflow.json").read_text())
    assert saved["tracking_uri"] == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["lora-r"] == "8" and run.data.params["tracking"] == "mlflow"
    records = _records(run_dir)
    for name in ("global/val_accuracy", "central/accuracy", "site/site-1/train_loss", "traffic/bytes_down"):
        history = {m.step: m.value for m in client.get_metric_history(saved["run_id"], name)}
        assert history == {r.round: pytest.approx(round_scalars(r)[name], rel=1e-6) for r in records}, name
    files = {f.path for f in client.list_artifacts(saved["run_id"])}
    assert {"report.md", "summary.json", "metrics.jsonl", "accuracy.png", "adapter"} <= files
    adapter = {f.path for f in client.list_artifacts(saved["run_id"], "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter


def test_an_unusable_tracking_setting_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'tracking'"):
        RunSettings.from_run_config({**default_run_config(), "tracking": "wandb"})
    out = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", "--output-dir", str(tmp_path / "runs"),
         "--set", "tracking=mlflow", "--set", "tracking-uri=bogus://nowhere"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "tracking-uri 'bogus://nowhere': MLflow cannot use it" in last, out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


class _Broken:
    def __init__(self) -> None:
        self.calls = 0

    def start(self, params: Any, resumed: bool) -> None: ...

    def log_round(self, record: RoundRecord) -> None:
        self.calls += 1
        raise OSError("No space left on device")

    def finish(self, run_folder: Path) -> None: ...


def test_a_tracker_that_fails_mid_run_is_switched_off_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records: list[RoundRecord] = []
    broken = _Broken()
    settings = RunSettings.from_run_config(default_run_config())
    sink = RoundSink(records.append, lambda: list(records), broken, settings, tmp_path, "r", {"num_params": 1})
    with caplog.at_level("WARNING", logger="fedtune.server"):
        for n in (1, 2):
            sink(RoundRecord(round=n, aggregate={"val_accuracy": 0.5 + n / 10}, sites={"a": {"train_loss": 1.0}}))
    assert [r.round for r in records] == [1, 2] and broken.calls == 1
    assert "tracking (tensorboard) failed at round 1, switched off for this run: No space left on device" in caplog.text
    report = (tmp_path / "report.md").read_text()
    assert "rounds completed: 2 of" in report  # the views still follow every round
    assert (tmp_path / "loss.png").exists() and (tmp_path / "accuracy.png").exists()


def test_round_scalars_name_every_value_safely() -> None:
    record = RoundRecord(
        round=3,
        sites={
            "bank a/1": {"node_id": 7, "site": "bank a/1", "train_loss": 0.5, "dp_epsilon": 2.0, "bad": float("nan")}
        },
        aggregate={"val_accuracy": 0.9},
        central={"accuracy": 0.8},
        skipped=False,
        dp_epsilon_max=2.0,
        bytes_up=10,
        bytes_down=20,
        round_seconds=1.5,
        dispatch={"stage_seconds": 1.2, "stages": 5},
        failure_reasons=["site-9: refused"],
        failures=1,
    )
    got = round_scalars(record)
    assert got == {
        "global/val_accuracy": 0.9,
        "central/accuracy": 0.8,
        "site/bank a/1/train_loss": 0.5,
        "site/bank a/1/dp_epsilon": 2.0,
        "privacy/epsilon/bank a/1": 2.0,
        "privacy/epsilon_worst_site": 2.0,
        "traffic/bytes_up": 10.0,
        "traffic/bytes_down": 20.0,
        "time/round_seconds": 1.5,
        "time/dispatch/stage_seconds": 1.2,
        "time/dispatch/stages": 5.0,
        "round/skipped": 0.0,
        "round/failures": 1.0,
    }
    odd = round_scalars(RoundRecord(round=1, sites={"x<y>": {"loss": 1.0}}))
    assert "site/x_y_/loss" in odd
