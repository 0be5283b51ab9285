"""`flwr run .` works on Flower's managed local SuperLink, installs nothing at run
time, and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flwr_run_dot(tmp_path: Path, tiny_bert_dir: Path, sentiment_data: dict[str, Path]) -> None:
    flwr_home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FEDTUNE_SITES": "2",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    run_config = " ".join(
        [
            f"model='{tiny_bert_dir}'",
            f"data-path='{sentiment_data['train']}'",
            f"labels-file='{sentiment_data['labels']}'",
            f"central-eval-path='{sentiment_data['test']}'",
            "num-rounds=1",
            "local-steps=4",
            "batch-size=16",
            f"output-dir='{tmp_path / 'runs'}'",
            "run-name='viaflwr'",
        ]
    )
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "flwr_run_local.sh"), "--run-config", run_config],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "viaflwr"
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert "test accuracy" in proc.stdout
    # No runtime dependency installation happened, and the SuperLink is gone.
    log = (flwr_home / "local-superlink" / "superlink.log").read_text()
    assert "uv sync" not in log and "Installing application dependencies" not in log
    marker = str(flwr_home / "local-superlink" / "superlink.log")
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
    # `flwr run` must not have rewritten the project's pyproject.toml.
    assert "[tool.flwr.federations" not in (REPO / "pyproject.toml").read_text()
