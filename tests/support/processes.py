"""Starting and stopping Flower's processes (and the registry) in tests and benchmarks:
each in its own session, logging to a file, stopped by PID with the helpers Flower
detaches from it; a free loopback port; waiting for a port to open."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.flower_env import child_env


class ManagedProcesses:
    """Starts Flower's processes in their own sessions, logging to files, and stops
    every one of them, and the helpers Flower detaches from them, by PID."""

    def __init__(self, logs: Path, cwd: Path | None = None) -> None:
        self.logs = logs
        self.cwd = cwd
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, env=env or child_env(), start_new_session=True
        )
        self.started.append(proc)
        return proc

    @staticmethod
    def helpers(pid: int) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"[-]-parent-pid {pid}( |$)"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop_all(self, grace: float = 20.0) -> None:
        pids = []
        for proc in self.started:
            pids += [proc.pid, *self.helpers(proc.pid)]
        for pid in pids:
            _signal_group(pid, signal.SIGTERM)
        deadline = time.time() + grace
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in pids:
            _signal_group(pid, signal.SIGKILL)

    def alive(self) -> list[int]:
        return [p.pid for p in self.started if p.poll() is None]


def _signal_group(pid: int, sig: int) -> None:
    for send in (lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)):
        try:
            send()
        except (ProcessLookupError, PermissionError):
            pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    """Wait until 127.0.0.1:port accepts connections; fail early if `proc` died."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise FedtuneError(
                    f"process exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
                ) from None
            time.sleep(0.3)
    raise FedtuneError(f"port {port} never opened: {log.read_text(errors='replace')[-2000:]}")


def site_command(superlink: str, ca: Path, key: Path, data: Path, state_dir: Path, *extra: str) -> list[str]:
    """`fedtune deploy site` as a site operator types it: the SuperLink, the CA, the site's
    key, its data and its state folder, on a free port; `extra` adds the site's own flags."""
    fedtune = str(Path(sys.executable).parent / "fedtune")
    return [
        fedtune, "deploy", "site", "--superlink", superlink, "--ca", str(ca), "--key", str(key),
        "--data", str(data), "--port", str(free_port()), "--state-dir", str(state_dir), *extra,
    ]  # fmt: skip
