"""The site worker's private channel, on a real worker process: the socket's directory
and file modes, a connection from another uid, an oversize message and a wrong protocol
version are each refused (and the worker stays up); the thin ClientApp imports no torch.
The whole deployed flow (model loaded once, worker killed mid-round) is in test_deploy.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from support.run_configs import sentiment_config

from fedtune.client import worker_protocol as wire
from fedtune.client.worker_client import call_worker
from fedtune.errors import FedtuneError
from fedtune.flower_env import child_env

FEDTUNE = str(Path(sys.executable).parent / "fedtune")
NOBODY = 65534


@pytest.fixture()
def worker(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    yield from _worker(tmp_path)


@pytest.fixture()
def worker_with_two_ranks(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """The worker and a second gloo rank (`--devices 2`) sharing this CPU."""
    yield from _worker(tmp_path, "--devices", "2")


def _worker(tmp_path: Path, *extra: str) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    # The socket under a folder another user may traverse (pytest's own is 0700), so that
    # only the worker's own protections stand between it and another uid.
    base = Path(tempfile.mkdtemp(prefix="ftw-", dir="/tmp"))
    base.chmod(0o711)
    path = base / "w" / "worker.sock"
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [FEDTUNE, "deploy", "worker", "--socket", str(path), "--max-message-mb", "1", "--simulation", *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env(),
    )
    try:
        deadline = time.time() + 60
        while not path.exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
        yield path, proc
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert not path.exists()  # the worker removes its socket on a clean stop
        shutil.rmtree(base)


def raw_request(path: Path, *frames: tuple[dict, bytes | None]) -> list[dict]:
    """Send `frames` (a header, or raw bytes standing for one) and read a reply after each."""
    replies = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        for header, raw in frames:
            try:
                if raw is None:
                    wire.send_frame(sock, header)
                else:
                    sock.sendall(raw)
            except BrokenPipeError:
                pass  # the worker refused this peer and closed at once; its reply is still there to read
            reply, _ = wire.recv_frame(sock)
            replies.append(reply)
            if not reply.get("ok"):
                break
    return replies


def test_socket_is_private_and_the_worker_answers(worker: tuple[Path, subprocess.Popen[bytes]]) -> None:
    path, proc = worker
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
    status, _ = call_worker(path, "status", {})
    assert status["pid"] == proc.pid and status["model_loads"] == 0 and status["version"] == wire.VERSION


def test_wrong_protocol_version_and_oversize_message_are_refused(worker: tuple[Path, subprocess.Popen[bytes]]) -> None:
    path, _ = worker
    [reply] = raw_request(path, ({"op": "hello", "protocol": wire.PROTOCOL, "version": 99}, None))
    assert reply == {"ok": False, "error": "protocol version 99 is not supported (this worker speaks 1)"}
    # After a good hello, a request announcing 2 MiB of tensors to a worker that takes 1 MiB:
    # refused from the length prefix, before a byte of it is read.
    oversize = struct.pack(">4sIQ", wire.MAGIC, 2, 2 << 20) + b"{}"
    hello, reply = raw_request(path, (wire.hello(), None), ({}, oversize))
    assert hello["ok"] and not reply["ok"] and "exceeds the limit of 1048576 bytes" in reply["error"]
    [reply] = raw_request(path, ({}, b"GET / HTTP/1.1\r\n\r\n" + bytes(16)))
    assert not reply["ok"] and "not a fedtune-site-worker message" in reply["error"]
    status, _ = call_worker(path, "status", {})
    assert status["refused"] == 3  # and the worker is still up


def _connect_as(uid: int, path: Path) -> str:
    """Connect from a child process running as `uid`; what it saw, as one word or the reply."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to `uid`, try the worker, report through the pipe
        os.close(read)
        try:
            os.setgid(uid)
            os.setuid(uid)
            try:
                [reply] = raw_request(path, (wire.hello(), None))
                result = str(reply.get("error") or "accepted")
            except PermissionError:
                result = "permission-denied"
            except (wire.ProtocolError, OSError) as err:
                result = f"error: {err}"
            os.write(write, result.encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        return pipe.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_another_uid_is_refused_by_the_directory_and_by_peer_credentials(
    worker: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    path, _ = worker
    # As the worker leaves it, another user cannot even reach the socket (0700 directory, 0600 socket).
    assert _connect_as(NOBODY, path) == "permission-denied"
    # With both opened up by mistake, the worker still refuses the peer by its uid (SO_PEERCRED).
    path.parent.chmod(0o755)
    path.chmod(0o666)
    assert _connect_as(NOBODY, path) == f"uid {NOBODY} may not use this site worker"
    assert call_worker(path, "status", {})[0]["refused"] == 1


def test_worker_that_is_down_is_one_line_in_time(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(FedtuneError, match="worker.sock: not running"):
        call_worker(tmp_path / "worker.sock", "fit", {}, connect_timeout=1.0)
    assert time.monotonic() - started < 30


def test_a_socket_path_too_long_for_unix_sockets_is_one_line(tmp_path: Path) -> None:
    long = tmp_path / ("x" * 120) / "worker.sock"
    run = subprocess.run(
        [FEDTUNE, "deploy", "worker", "--socket", str(long), "--simulation"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert run.returncode == 1 and "at most 107 bytes" in run.stderr and "Traceback" not in run.stderr


def test_the_thin_clientapp_imports_no_torch() -> None:
    probe = (
        "import sys; import client.flower_app; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        env=child_env(),
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulation_with_one_two_rank_worker_serving_every_virtual_site(
    worker_with_two_ranks: tuple[Path, subprocess.Popen[bytes]],
    tmp_path: Path,
    federate,
    tiny_bert_dir: Path,
    sentiment_data: dict[str, Path],
) -> None:
    path, _ = worker_with_two_ranks
    run_dir = federate(
        tmp_path,
        "via-worker",
        {
            **sentiment_config(tiny_bert_dir, sentiment_data),
            "secagg": True,
            "num-rounds": 2,
            "site-worker-socket": str(path),
        },
    )
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and all(len(r["sites"]) == 2 for r in records)
    status, _ = call_worker(path, "status", {})
    assert status["model_loads"] == 1  # both virtual sites trained on the worker's one model
    assert sorted((r["node_config"]["partition-id"], r["rounds"]) for r in status["runs"]) == [(0, [1, 2]), (1, [1, 2])]
    log = (tmp_path / "worker.log").read_text()
    assert "2 ranks joined (gloo)" in log
    assert log.count("site rank 1: round") == 4  # the second rank trained every site's every round with it


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_distributed_dp_through_the_worker_sizes_its_share_from_the_protocol(
    worker: tuple[Path, subprocess.Popen[bytes]],
    tmp_path: Path,
    federate,
    tiny_bert_dir: Path,
    sentiment_data: dict[str, Path],
) -> None:
    """The thin ClientApp reads SecAgg+'s threshold from its own protocol state and hands it
    to the worker with the train config: the worker's noise share follows it."""
    path, _ = worker
    run_dir = federate(
        tmp_path,
        "ddp-via-worker",
        {
            **sentiment_config(tiny_bert_dir, sentiment_data),
            "secagg": True,
            "num-rounds": 2,
            "dp": True,
            "dp-mode": "distributed",
            "dp-noise-multiplier": 1.0,
            "site-worker-socket": str(path),
            "site-state-dir": str(tmp_path / "state"),
        },
    )
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    sites = [s for r in records for s in r["sites"].values()]
    assert len(sites) == 4 and all(s["dp_noise_shares"] == 2 and s["steps"] == 1 for s in sites)
    assert all(s["dp_epsilon_own_noise"] > s["dp_epsilon"] > 0 for s in sites)


def test_malformed_requests_are_one_line_refusals(worker: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """Untrusted requests from the ClientApp: a garbage message, no run settings, a null
    config, an unknown op; each is refused with one line and no traceback in the worker's log."""
    import numpy as np

    path, _ = worker
    garbage = np.frombuffer(b"\x08\x96\x01not a flower message", dtype=np.uint8)
    for header, arrays, expected in (
        ({"run_config": {}}, [garbage], "not a Flower message"),
        ({}, [], "a relayed message is one uint8 tensor"),
        ({"run_config": None, "config": None}, [np.zeros(3, dtype=np.float32)], "one uint8 tensor"),
    ):
        with pytest.raises(FedtuneError, match=expected):
            call_worker(path, "message", header, arrays)
    with pytest.raises(FedtuneError, match="unknown request 'fit'"):
        call_worker(path, "fit", {"run": None, "config": None})
    assert "Traceback" not in (tmp_path / "worker.log").read_text()
    assert call_worker(path, "status", {})[0]["runs"] == []  # nothing was created for them
