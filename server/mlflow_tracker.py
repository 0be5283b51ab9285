"""The coordinator's MLflow view of a run: the run config as parameters once, the round's
scalars (`round_scalars.py`) after every round, and at the end the report, the plots and
the final adapter as artefacts. The store is the operator's `tracking-uri`, by default a
SQLite file beside the run folders (`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`).
A resumed run goes on in the same MLflow run (its id is kept in the run folder)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping

from fedtune.errors import FedtuneError
from fedtune.run_folder import RoundRecord

from .round_scalars import round_notes, round_scalars

MLFLOW_FILE = "mlflow.json"  # in the run folder: which MLflow run this run writes to
_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
_PARAM_VALUE_CHARS = 6000


def default_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


class MlflowTracker:
    """Writes one fedtune run to one MLflow run (step = the run's round)."""

    def __init__(self, uri: str, experiment: str, run_folder: Path, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # the store's set-up notices are not the run's progress
            logging.getLogger(name).setLevel(logging.WARNING)
        output_dir = run_folder.parent
        self.uri = uri or default_uri(output_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        saved = run_folder / MLFLOW_FILE
        try:
            if saved.exists():  # a resume: the same MLflow run goes on
                self.run_id = str(json.loads(saved.read_text())["run_id"])
                self.client.update_run(self.run_id, status="RUNNING")
                return
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                artifacts = None if uri else (output_dir / "mlartifacts").resolve().as_uri()
                experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        except Exception as err:  # an unreachable server, a bad URI, a store it cannot write
            raise FedtuneError(f"tracking-uri {self.uri!r}: MLflow refused the run: {_one_line(err)}") from None
        tmp = saved.with_name(f".{MLFLOW_FILE}.tmp")
        tmp.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}))
        tmp.replace(saved)

    def start(self, params: Mapping[str, object], resumed: bool) -> None:
        if resumed:
            return  # MLflow's parameters are written once; the run config of a resume is the same
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_VALUE_CHARS]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_round(self, record: RoundRecord) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record.round) for k, v in round_scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        notes = round_notes(record)
        if notes:
            self.client.log_text(self.run_id, notes, f"rounds/round-{record.round:03d}.txt")

    def finish(self, run_folder: Path) -> None:
        for name in ("report.md", "summary.json", "metrics.jsonl", *sorted(p.name for p in run_folder.glob("*.png"))):
            if (run_folder / name).exists():
                self.client.log_artifact(self.run_id, str(run_folder / name))
        if (run_folder / "final").is_dir():
            self.client.log_artifacts(self.run_id, str(run_folder / "final"), "adapter")
        self.client.set_terminated(self.run_id)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


def check_tracking_uri(uri: str) -> None:
    """Refuse, in one line and before anything is written, an MLflow store the run could not
    write to: an unknown scheme, a server that does not answer (asked once, 10 s at most)."""
    import os

    from mlflow.tracking import MlflowClient

    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    before = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:
        raise FedtuneError(f"tracking-uri {uri!r}: MLflow cannot use it: {_one_line(err)}") from None
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
