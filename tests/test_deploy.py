"""Real deployment on 127.0.0.1: a TLS SuperLink with SuperNode authentication, two
site SuperNodes (each with its own data file and port), a 2-round SecAgg+ run of a
tiny model launched with `flwr run`, and the refusals a site operator must see: an
unregistered key, a plaintext connection, a wrong CA and a bad data file. Every
process the test starts is stopped by PID, also when it fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from fedtune.server.deployment import init_pki, register_site, run_command, site_keypair
from safetensors.numpy import load_file
from support.processes import ManagedProcesses, free_port, wait_for_port

from fedtune.flower_env import child_env
from fedtune.tls import create_ca

REPO = Path(__file__).resolve().parent.parent
FEDTUNE = str(Path(sys.executable).parent / "fedtune")


def wait_for_log(path: Path, needle: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} not in {path}: {path.read_text(errors='replace')[-3000:]}")


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[ManagedProcesses]:
    procs = ManagedProcesses(tmp_path, cwd=REPO)
    try:
        yield procs
    finally:
        procs.stop_all()
        assert procs.alive() == []


@pytest.mark.timeout(1200)
def test_tls_superlink_with_site_auth_runs_secagg_and_refuses_strangers(
    tmp_path: Path, processes: ManagedProcesses, tiny_bert_dir: Path, sentiment_data: dict[str, Path]
) -> None:
    deploy = tmp_path / "deploy"
    ca, _, _ = init_pki(deploy, ["127.0.0.1", "localhost"])
    keys = {site: site_keypair(deploy, site) for site in ("bank-a", "bank-b", "stranger")}
    rows = sentiment_data["train"].read_text().splitlines()
    data = {"bank-a": tmp_path / "bank-a.jsonl", "bank-b": tmp_path / "bank-b.jsonl"}
    data["bank-a"].write_text("\n".join(rows[: len(rows) // 2]) + "\n")
    data["bank-b"].write_text("\n".join(rows[len(rows) // 2 :]) + "\n")

    port = free_port()
    superlink = processes.start("superlink", [FEDTUNE, "deploy", "superlink", "--dir", str(deploy),
                                              "--host", "127.0.0.1", "--port", str(port)])
    wait_for_port(port, superlink, tmp_path / "superlink.log")
    address = f"127.0.0.1:{port}"
    for site in ("bank-a", "bank-b"):
        assert "registered" in register_site(deploy, keys[site][1], address)

    def site_cmd(site: str, key: Path, data_file: Path, ca_file: Path = ca, *extra: str) -> list[str]:
        return [FEDTUNE, "deploy", "site", "--superlink", address, "--ca", str(ca_file), "--key", str(key),
                "--data", str(data_file), "--port", str(free_port()), "--state-dir", str(tmp_path / "state" / site),
                *extra]

    for site in ("bank-a", "bank-b"):
        processes.start(site, site_cmd(site, keys[site][0], data[site]))

    # Refusals, each one line and a non-zero exit: an unregistered key, a wrong CA, a bad data file.
    stranger = subprocess.run(site_cmd("stranger", keys["stranger"][0], data["bank-a"]), capture_output=True,
                              text=True, env=child_env(), timeout=180)
    assert stranger.returncode == 1 and "not registered" in stranger.stderr, stranger.stdout[-2000:] + stranger.stderr
    other_ca = create_ca(tmp_path / "other-pki")
    wrong_ca = subprocess.run(site_cmd("bank-a", keys["bank-a"][0], data["bank-a"], other_ca), capture_output=True,
                              text=True, env=child_env(), timeout=60)
    assert wrong_ca.returncode == 1 and "did not sign" in wrong_ca.stderr and "Traceback" not in wrong_ca.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "pos"}\n{"text": "", "label": "neg"}\n')
    bad_data = subprocess.run(site_cmd("bank-a", keys["bank-a"][0], bad), capture_output=True, text=True,
                              env=child_env(), timeout=60)
    assert bad_data.returncode == 1 and f"{bad}:2: field 'text'" in bad_data.stderr
    # Plaintext to the TLS SuperLink: an HTTP request is refused, and an --insecure SuperNode never joins.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{address}/", timeout=10).read()
    plain = processes.start("plaintext", [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", address,
                                          "--insecure", "--port", str(free_port()), "--max-retries", "2",
                                          "--max-wait-time", "20"])
    assert plain.wait(timeout=120) != 0  # gave up: the TLS SuperLink never answered in plaintext
    assert "SuperNode ID" not in (tmp_path / "plaintext.log").read_text(errors="replace")

    # Two registered sites joined; run 2 rounds with SecAgg+ through `flwr run`.
    for site in ("bank-a", "bank-b"):
        wait_for_log(tmp_path / f"{site}.log", "SuperNode ID")
    run_config = (f'model="{tiny_bert_dir}" labels-file="{sentiment_data["labels"]}" '
                  f'central-eval-path="{sentiment_data["test"]}" num-rounds=2 local-steps=4 batch-size=16 '
                  f'learning-rate=0.05 val-fraction=0.2 secagg=true min-sites=2 secagg-timeout=300.0 '
                  f'output-dir="{tmp_path / "runs"}" run-name="deployed"')
    cmd, env = run_command(deploy, REPO, [run_config])
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    run_dir = tmp_path / "runs" / "deployed"
    assert run.returncode == 0 and (run_dir / "summary.json").exists(), run.stdout[-3000:] + run.stderr[-2000:]

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(sorted(r["sites"]) == ["bank-a", "bank-b"] and r["failures"] == 0 for r in records)
    secagg = json.loads((run_dir / "secagg.json").read_text())
    assert secagg["sites_at_start"] == 2
    start = load_file(str(run_dir / "round-000" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert start.keys() == final.keys() and any(".lora_B." in k for k in final)
    assert all(np.isfinite(v).all() for v in final.values())
    assert any(not np.array_equal(start[k], final[k]) for k in final)
    assert json.loads((run_dir / "summary.json").read_text())["central"]["accuracy"] >= 0
