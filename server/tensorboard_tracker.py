"""The coordinator's TensorBoard view of a run: after every round, the round's scalars
(`round_scalars.py`) as event files in the run folder's `tensorboard/`, which
`tensorboard --logdir runs/` shows beside every other run, live."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from fedtune.run_folder import RoundRecord

from .round_scalars import round_notes, round_scalars

TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracker:
    """Writes one run's rounds to TensorBoard event files (step = the run's round)."""

    def __init__(self, run_folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run_folder / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.folder), flush_secs=10)

    def start(self, params: Mapping[str, object], resumed: bool) -> None:
        if not resumed:
            table = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
            self.writer.add_text("run/settings", "| setting | value |\n|---|---|\n" + table, 0)

    def log_round(self, record: RoundRecord) -> None:
        for name, value in round_scalars(record).items():
            self.writer.add_scalar(name, value, record.round)
        notes = round_notes(record)
        if notes:
            self.writer.add_text("round/notes", notes, record.round)
        self.writer.flush()  # a round is minutes apart: the view is current when it ends

    def finish(self, run_folder: Path) -> None:
        self.writer.close()
