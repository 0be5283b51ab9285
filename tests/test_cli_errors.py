"""Errors a user meets at the command line are one line, a non-zero exit and no
traceback: a misspelt `--set` key (naming the closest valid key), a certificate file
that is not a certificate, an unreachable registry, a missing file, a misspelt key in bench/llm.py's
--federated-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.processes import free_port

from fedtune.flower_env import child_env

FEDTUNE = str(Path(sys.executable).parent / "fedtune")


def fedtune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDTUNE, *args], capture_output=True, text=True, env=child_env(), timeout=120)


def one_line_error(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: "), run.stderr
    return lines[0]


def test_misspelt_set_key_names_the_closest_valid_key() -> None:
    line = one_line_error(fedtune("simulate", "--set", "lora-rank=4"))
    assert line == "fedtune: error: --set lora-rank=4: unknown key 'lora-rank'; did you mean 'lora-r'?"
    line = one_line_error(fedtune("check-data", "data/banking77/test.jsonl", "--set", "num-round=2"))
    assert "did you mean 'num-rounds'?" in line


def test_bad_certificate_and_unreachable_registry_are_one_line(tmp_path: Path, keys: dict[str, Path]) -> None:
    from fedtune.tls import create_ca

    ca = create_ca(tmp_path / "pki")
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    common = ["edge", "pull", "--model", "m", "--trust-key", str(keys["public"]), "--into", str(tmp_path / "device")]
    line = one_line_error(fedtune(*common, "--registry", f"127.0.0.1:{free_port()}", "--ca", str(bad)))
    assert f"{bad}: not a usable PEM CA certificate" in line
    line = one_line_error(fedtune(*common, "--registry", f"127.0.0.1:{free_port()}", "--ca", str(ca)))
    assert "UNAVAILABLE" in line
    line = one_line_error(fedtune(*common, "--registry", "127.0.0.1:1", "--ca", str(tmp_path / "missing.pem")))
    assert "missing.pem: CA certificate file not found" in line


def test_site_floor_flags_are_checked_before_anything_is_dialled(tmp_path: Path) -> None:
    site = [
        "deploy",
        "site",
        "--superlink",
        f"127.0.0.1:{free_port()}",
        "--ca",
        str(tmp_path / "ca.pem"),
        "--key",
        str(tmp_path / "site.key"),
        "--data",
        str(tmp_path / "site.jsonl"),
    ]
    line = one_line_error(fedtune(*site, "--own-noise-only"))
    assert line == "fedtune: error: --own-noise-only applies to --max-epsilon: set both"
    line = one_line_error(fedtune(*site, "--max-epsilon", "0"))
    assert line == "fedtune: error: --max-epsilon must be > 0, got 0.0"
    line = one_line_error(fedtune(*site, "--devices", "2", "--device", "cpu"))
    assert "--device cpu names one device; --devices 2" in line
    line = one_line_error(fedtune(*site, "--devices", "2", "--no-worker"))
    assert line == "fedtune: error: --devices needs the site worker: the ranks live next to it (drop --no-worker)"
    assert not any(tmp_path.iterdir())  # nothing written


def test_gate_flags_are_one_line(tmp_path: Path) -> None:
    """The release gate's own flags, at the coordinator and at a site, before anything is dialled."""
    line = one_line_error(
        fedtune(
            "gate",
            str(tmp_path / "no-run"),
            "--bundle",
            "b",
            "--model",
            "m",
            "--version",
            "v",
            "--key",
            "k",
            "--registry",
            "127.0.0.1:1",
            "--token-file",
            "t",
        )  # fmt: skip
    )
    assert line == f"fedtune: error: {tmp_path / 'no-run'}: not a finished run (no final adapter)"
    data = tmp_path / "site.jsonl"
    data.write_text('{"text": "fine", "label": "pos"}\n')
    site = ["deploy", "site", "--superlink", f"127.0.0.1:{free_port()}", "--ca", str(tmp_path / "ca.pem")]
    site += ["--key", str(tmp_path / "site.key"), "--data", str(data)]
    line = one_line_error(fedtune(*site, "--gate-registry", "not an address"))
    assert line == "fedtune: error: --gate-registry 'not an address': expected host:port"
    line = one_line_error(fedtune(*site, "--gate-registry", "127.0.0.1:1"))
    assert "--gate-registry and --gate-trust-key go together" in line


def test_bench_llm_federated_config_bad_key_names_its_flag() -> None:
    """bench/llm.py's --federated-config is checked before any model loads: one line naming the flag."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "llm.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--federated-config", "keep-optimiser-state=true"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1] == (
        "llm.py: error: --federated-config 'keep-optimiser-state=true': "
        "unknown key 'keep-optimiser-state'; did you mean 'keep-optimizer-state'?"
    )
