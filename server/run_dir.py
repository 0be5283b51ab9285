"""The run folder `runs/<run-id>/`: per-round PEFT adapters, `metrics.jsonl`, the
final adapter, plots and the report."""

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


@dataclass
class RunDir:
    """Paths and writers for one run; every write is append-only or atomic."""

    path: Path

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def round_dir(self, server_round: int) -> Path:
        return self.path / f"round-{server_round:03d}"

    @property
    def final_dir(self) -> Path:
        return self.path / "final"

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

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line and flush it to disk."""
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]

    def save_adapter(
        self, model: PeftModel, arrays: Sequence[np.ndarray], out_dir: Path, metadata: dict[str, Any],
        lora: LoraSettings | None = None,
    ) -> Path:
        """Load the global arrays into the template model and save it in PEFT format
        (the whole adapter: with FFA-LoRA the frozen A comes from the shared seed)."""
        set_adapter_arrays(model, arrays, lora)
        return save_adapter(model, out_dir, metadata)
