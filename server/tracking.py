"""What happens to a round once it is done: its line in metrics.jsonl (the record), then
the live views: the run's tracker (`tracking`: TensorBoard or MLflow) and the plots and
report in the run folder, rewritten whole after every round, not only at the end.

A tracker that cannot start refuses the run in one line before round 1; one that fails
mid-run (a full disk, a tracking server gone) is reported once and switched off: the
federation, its record and its checkpoints go on."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from fedtune.config import RunSettings
from fedtune.run_folder import RoundRecord, Summary

from .plots import save_plots
from .report import write_report

log = logging.getLogger("fedtune.server")


class Tracker(Protocol):
    """A live view of one run."""

    def start(self, params: Mapping[str, object], resumed: bool) -> None: ...

    def log_round(self, record: RoundRecord) -> None: ...

    def finish(self, run_folder: Path) -> None: ...


def open_tracker(settings: RunSettings, run_folder: Path, run_id: str) -> Tracker | None:
    """The run's tracker, started (its parameters logged on a fresh run); None for `none`."""
    tracker: Tracker | None = None
    if settings.tracking == "tensorboard":
        from .tensorboard_tracker import TensorBoardTracker

        tracker = TensorBoardTracker(run_folder)
    elif settings.tracking == "mlflow":
        from .mlflow_tracker import MlflowTracker

        tracker = MlflowTracker(settings.tracking_uri, settings.tracking_experiment, run_folder, run_id)
    if tracker is not None:
        tracker.start(settings.to_run_config(), resumed=settings.resume)
    return tracker


class RoundSink:
    """Records each finished round, then refreshes the tracker, the plots and the report."""

    def __init__(
        self,
        append_record: Callable[[RoundRecord], None],
        read_records: Callable[[], list[RoundRecord]],
        tracker: Tracker | None,
        settings: RunSettings,
        run_folder: Path,
        run_id: str,
        adapter_info: dict[str, Any],
    ) -> None:
        self.append_record = append_record
        self.read_records = read_records
        self.tracker = tracker
        self.settings = settings
        self.run_folder = run_folder
        self.run_id = run_id
        self.adapter_info = adapter_info
        self.started = time.monotonic()

    def __call__(self, record: RoundRecord) -> None:
        self.append_record(record)  # the record first: nothing below may lose it
        if self.tracker is not None:
            try:
                self.tracker.log_round(record)
            except Exception as err:
                log.warning(
                    "tracking (%s) failed at round %d, switched off for this run: %s",
                    self.settings.tracking,
                    record.round,
                    " ".join(str(err).split())[:300],
                )
                self.tracker = None
        self.write_views()

    def write_views(self, summary: Summary | None = None) -> None:
        """The plots and report of the rounds so far (with `summary`: the final ones)."""
        records = self.read_records()
        if summary is None:
            summary = Summary(
                run_id=self.run_id,
                run_dir=str(self.run_folder),
                rounds=len(records),
                central=next((r.central for r in reversed(records) if r.central), None),
                site_validation=records[-1].aggregate if records else {},
                seconds=round(time.monotonic() - self.started, 2),
            )
        plots = save_plots(records, self.run_folder, self.settings.task)
        write_report(self.run_folder / "report.md", self.settings, records, summary, plots, self.adapter_info)

    def finish(self, summary: Summary) -> None:
        """The final plots and report, then the tracker's artefacts."""
        self.write_views(summary)
        if self.tracker is not None:
            try:
                self.tracker.finish(self.run_folder)
            except Exception as err:
                log.warning("tracking (%s) could not store the run's files: %s", self.settings.tracking, err)
