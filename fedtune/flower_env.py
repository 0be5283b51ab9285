"""Where Flower's command-line tools are and the environment its processes run in:
this interpreter's console scripts first on PATH, no telemetry, no update check, no
runtime dependency installation (nothing is downloaded), Hugging Face offline, and
SuperExec polling for tasks every 0.1 s (Flower's default: 1 s)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from fedtune.errors import FedtuneError

# The one list of quiet, offline variables: the CLI, the test suite and the benchmarks apply
# it (a value the user set wins); Flower's child processes get it as well.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# The Simulation Engine's Ray workers on top: every actor's log line, no tokenizer threads
# fighting Ray's, and Ray leaves CUDA_VISIBLE_DEVICES alone on a CPU-only actor.
SIMULATION_ENV = {
    **QUIET_ENV,
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def apply_env(variables: dict[str, str] = QUIET_ENV) -> None:
    """Set each variable this process has not set itself."""
    for key, value in variables.items():
        os.environ.setdefault(key, value)


def bin_dir() -> Path:
    """The folder of this interpreter's console scripts (flower-*, flwr)."""
    return Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise FedtuneError(f"'{name}' not found: install the train extra (pip install 'fedtune[train]')")
    return found


def child_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower's processes: our console scripts first on PATH, no
    telemetry, and no runtime dependency installation (nothing is downloaded)."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env.update(QUIET_ENV)
    # SuperExec asks its SuperNode/SuperLink for a task to launch every second by default.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env
