"""Finding the demo's fine-tuned run for the benchmarks that start from it."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "_work"


def find_demo_run() -> Path:
    """The newest finished seq-cls run of the demo setting (default model, >= 16 rounds)
    under runs/ or bench/_work/runs/."""
    candidates = []
    for root in (ROOT / "runs", WORK / "runs"):
        for summary in root.glob("*/summary.json"):
            info = json.loads((summary.parent / "run.json").read_text())
            if (
                info["task"] == "seq-cls"
                and info["base_model"] == "default"
                and (summary.parent / "final").exists()
                and info["settings"]["num-rounds"] >= 16
            ):
                candidates.append(summary.parent)
    if not candidates:
        raise SystemExit("no finished demo run found; run `make demo` first or pass --run-dir")
    return max(candidates, key=lambda p: p.stat().st_mtime)
