"""A site's own live curves, for its operator only: training loss and learning rate per
step, its validation per round and, under DP, its epsilon, as TensorBoard event files in
its state folder (STATE/<run key>/tensorboard/<site>/; `tensorboard --logdir STATE`).
Nothing here travels: the coordinator gets only what the site's replies release.

Steps count across rounds and restarts: where each round's steps begin is kept beside the
event files, so a worker that restarts goes on from where the last round ended."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .site_policy import check_site_name, run_key

_STEPS_FILE = "steps.json"
_WRITERS: dict[Path, Any] = {}  # one open writer per folder and process


def curves_folder(state_folder: Path, run_id: object, site: str) -> Path:
    """Where a site's curves of one run go (the run id is the message's: hashed, never a path)."""
    return state_folder / run_key(run_id) / "tensorboard" / check_site_name(site)


class SiteCurves:
    """The curves of one site in one run."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        if folder not in _WRITERS:
            folder.mkdir(parents=True, exist_ok=True)
            _WRITERS[folder] = SummaryWriter(log_dir=str(folder), flush_secs=30)
        self.writer = _WRITERS[folder]
        self.step = 0

    def start_round(self, server_round: int) -> None:
        """Steps of this round follow the last round that ended before it."""
        ends = self._ends()
        self.step = max((end for r, end in ends.items() if int(r) < server_round), default=0)

    def train_step(self, loss: float, lr: float) -> None:
        self.step += 1
        if math.isfinite(loss):
            self.writer.add_scalar("train/loss", loss, self.step)
        self.writer.add_scalar("train/learning_rate", lr, self.step)

    def end_round(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """The round's own numbers (mean loss, epsilon, ...) at step = the round."""
        self._scalars("round", server_round, metrics)
        ends = self._ends()
        ends[str(server_round)] = self.step
        tmp = self.folder / f".{_STEPS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(ends))
        os.replace(tmp, self.folder / _STEPS_FILE)
        self.writer.flush()

    def validation(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        self._scalars("validation", server_round, metrics)
        self.writer.flush()

    def _scalars(self, prefix: str, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def _ends(self) -> dict[str, int]:
        path = self.folder / _STEPS_FILE
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            return {}  # a damaged file costs only the x axis
        return {str(k): int(v) for k, v in data.items() if str(k).isdigit() and isinstance(v, int)}


class NoCurves(SiteCurves):
    """A site's other ranks (`fedtune deploy site --devices N`): rank 0 writes the site's curves."""

    def __init__(self) -> None:
        pass

    def start_round(self, server_round: int) -> None:
        pass

    def train_step(self, loss: float, lr: float) -> None:
        pass

    def end_round(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        pass

    def validation(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        pass
