"""Run `fedtune ...` with a coordinator that dies, like a `kill -9`, right after round N
is recorded: `python crashing_coordinator.py N simulate ...`. The crash is injected here,
by wrapping the run folder's metrics writer; the product has no such switch. `simulate`
runs `fedtune simulate` (crashing or not, or resuming) as a test would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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


REPO = Path(__file__).resolve().parent.parent.parent
CRASHING_COORDINATOR = Path(__file__).resolve()


def simulate(
    out: Path,
    run: str,
    sets: dict[str, object],
    crash_after: int = 0,
    resume: bool = False,
) -> subprocess.CompletedProcess[str]:
    launcher = ["-m", "fedtune.cli"] if not crash_after else [str(CRASHING_COORDINATOR), str(crash_after)]
    args = [sys.executable, *launcher, "simulate", "--sites", "2", "--output-dir", str(out), "--run-name", run]
    args += [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    if resume:
        args.append("--resume")
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True
    )
    try:
        stdout, _ = proc.communicate(timeout=900)
    finally:
        try:  # whatever the dead coordinator left behind (Ray) goes with its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(args, proc.returncode, stdout, "")


def rounds_done(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    crash_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
