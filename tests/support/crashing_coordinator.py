"""Run `fedtune ...` with a coordinator that dies, like a `kill -9`, right after round N
is recorded: `python crashing_coordinator.py N simulate ...`. The crash is injected here,
by wrapping the run folder's metrics writer; the product has no such switch."""

from __future__ import annotations

import os
import sys

from fedtune.cli import main
from fedtune.run_folder import RoundRecord
from fedtune.server.run_dir import RunDir


def crash_after(round_number: int) -> None:
    append = RunDir.append_round

    def append_then_die(self: RunDir, record: RoundRecord) -> None:
        append(self, record)
        if record.round == round_number:
            print(f"test: coordinator killed after round {round_number}", flush=True)
            os._exit(137)

    RunDir.append_round = append_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    crash_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
