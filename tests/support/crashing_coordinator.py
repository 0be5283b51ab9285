"""Run `fedtune ...` with a coordinator that dies, like a `kill -9`, right after round N
is recorded: `python crashing_coordinator.py N simulate ...`. The crash is injected here,
by wrapping the run folder's metrics writer; the product has no such switch."""

from __future__ import annotations

import os
import sys
from typing import Any

from fedtune.cli import main
from fedtune.server.run_dir import RunDir


def crash_after(round_number: int) -> None:
    append = RunDir.append_metrics

    def append_then_die(self: RunDir, record: dict[str, Any]) -> None:
        append(self, record)
        if record.get("round") == round_number:
            print(f"test: coordinator killed after round {round_number}", flush=True)
            os._exit(137)

    RunDir.append_metrics = append_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    crash_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
