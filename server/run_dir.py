"""The run folder `runs/<run-id>/` on the coordinator: where its files go and how they are
written (atomic JSON, fsynced round records, PEFT adapters). What the files hold is typed
in `fedtune/run_folder.py`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from peft import PeftModel

from fedtune.adapter_io import save_adapter, set_adapter_arrays
from fedtune.model import LoraSettings
from fedtune.run_folder import FINAL_DIR, METRICS_FILE, RoundRecord, read_rounds, round_dir_name


@dataclass
class RunDir:
    """Paths and writers for one run; every write is append-only or atomic."""

    path: Path

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def round_dir(self, server_round: int) -> Path:
        return self.path / round_dir_name(server_round)

    @property
    def final_dir(self) -> Path:
        return self.path / FINAL_DIR

    def create(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_json(self, name: str, data: Any) -> Path:
        """Write a JSON file atomically (temp file, then rename)."""
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, target)
        return target

    def append_round(self, record: RoundRecord) -> None:
        """Append the round's record as one JSON line and flush it to disk."""
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.to_json(), default=float) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_rounds(self) -> list[RoundRecord]:
        return read_rounds(self.path)

    def save_adapter(
        self,
        model: PeftModel,
        arrays: Sequence[np.ndarray],
        out_dir: Path,
        metadata: dict[str, Any],
        lora: LoraSettings | None = None,
    ) -> Path:
        """Load the global arrays into the template model and save it in PEFT format
        (the whole adapter: with FFA-LoRA the frozen A comes from the shared seed)."""
        set_adapter_arrays(model, arrays, lora)
        return save_adapter(model, out_dir, metadata)
