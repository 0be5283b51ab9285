"""The site's side of a deployment: pre-flight checks that turn a bad data file, a
wrong CA or an unregistered key into one line, the exact `flower-supernode` command
line, and running the site under its one command: the site worker (restarted if it
dies) and the SuperNode, relaying their output and stopping both (and the helpers
Flower detaches from the SuperNode) on exit or on a signal."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.data import load_classification, load_completions
from fedtune.errors import FedtuneError
from fedtune.flower_env import child_env, tool

UNREGISTERED_KEY = "[code: 2004]"  # flower-supernode: "[code: 2004] Failed to activate SuperNode."


def check_tls(superlink: str, ca: Path, timeout: float = 10.0) -> None:
    """Connect to the SuperLink and verify its certificate against `ca`."""
    host, _, port = superlink.rpartition(":")
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError) as err:
        raise FedtuneError(f"{ca}: not a usable CA certificate ({err})") from None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        raise FedtuneError(f"{ca}: the SuperLink at {superlink} presents a certificate this CA did not sign "
                           f"({err.verify_message}); ask the coordinator for the right ca.pem") from None
    except ssl.SSLError as err:
        raise FedtuneError(f"{superlink}: TLS handshake failed ({err.reason}); is it a TLS SuperLink?") from None
    except OSError as err:
        raise FedtuneError(f"{superlink}: cannot connect ({err.strerror or err})") from None


def check_site_data(data: Path, task: str, text_field: str, label_field: str, prompt_field: str,
                    completion_field: str) -> int:
    """Validate the site's data file the way training will read it; returns its size."""
    if task == "seq-cls":
        return len(load_classification(data, text_field, label_field, None))
    return len(load_completions(data, prompt_field, completion_field))


def site_keypair(folder: Path, site: str) -> tuple[Path, Path]:
    """The site's SuperNode key pair, made at the site: EC P-384 in OpenSSH format, the
    private key 0600 and never overwritten; only the public key goes to the coordinator."""
    private_path, public_path = folder / f"{site}.key", folder / f"{site}.pub"
    if private_path.exists():
        raise FedtuneError(f"{private_path}: already exists; refusing to overwrite a site key")
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path.write_bytes(public + f" {site}\n".encode())
    return private_path, public_path


def supernode_command(superlink: str, ca: Path, key: Path, data: Path, port: int, state_dir: Path,
                      max_retries: int | None = None, site_name: str = "", worker_socket: Path | None = None,
                      idle_poll: float = 3.0, privacy_floor: dict[str, object] | None = None) -> list[str]:
    """`flower-supernode` with TLS, the site's key and node config; an `idle_poll` below
    Flower's fixed 3 s runs it through `supernode_launcher.py`."""
    node_config = f'data-path="{data.resolve()}" state-dir="{state_dir.resolve()}" site-name="{site_name or data.stem}"'
    if worker_socket is not None:
        node_config += f' worker-socket="{worker_socket.resolve()}"'
    for key, value in (privacy_floor or {}).items():  # the site's own floor: require-secagg, max-epsilon, max-delta
        node_config += f" {key}={str(value).lower() if isinstance(value, bool) else value}"
    launcher = [tool("flower-supernode")]
    if idle_poll < 3.0:
        launcher = [sys.executable, "-m", f"{__package__}.supernode_launcher", "--idle-poll", str(idle_poll), "--"]
    cmd = [*launcher, "--superlink", superlink, "--root-certificates", str(ca),
           "--auth-supernode-private-key", str(key), "--node-config", node_config, "--port", str(port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def stop_helpers(pid: int) -> None:
    """Stop the helpers Flower detaches from a process (they carry `--parent-pid PID`)."""
    subprocess.run(["pkill", "-TERM", "-f", f"[-]-parent-pid {pid}( |$)"], capture_output=True)


def explain_supernode_exit(code: int, output: str, key: Path, superlink: str) -> str:
    if UNREGISTERED_KEY in output:
        return (f"{key}: this site's key is not registered with the SuperLink at {superlink}; send "
                f"{key.with_suffix('.pub').name} to the coordinator (fedtune deploy register)")
    last = [line for line in output.splitlines() if line.strip()][-3:]
    return f"the SuperNode stopped with exit code {code}: {' / '.join(x.strip() for x in last)}"


def worker_command(socket_path: Path, threads: int = 0, idle_timeout: float = 1800.0) -> list[str]:
    """The site worker, run by this interpreter (`fedtune deploy worker`)."""
    cmd = [sys.executable, "-m", "fedtune.cli", "deploy", "worker", "--socket", str(socket_path),
           "--idle-timeout", str(idle_timeout)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


class _Relay:
    """Runs a child with its output relayed to this terminal (prefixed) and kept."""

    def __init__(self, cmd: list[str], prefix: str = "") -> None:
        self.output: list[str] = []
        self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=child_env())
        # Read in a thread: Flower's detached SuperExec helper inherits the pipe and may
        # hold it open after the SuperNode itself has exited.
        self.reader = threading.Thread(target=self._relay, args=(prefix,), daemon=True)
        self.reader.start()

    def _relay(self, prefix: str) -> None:
        assert self.child.stdout is not None
        for line in self.child.stdout:
            self.output.append(line)
            print(f"{prefix}{line}", end="", flush=True)

    def stop(self, grace: float = 15.0) -> int:
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.child.kill()
        self.reader.join(timeout=2)
        return int(self.child.wait())


def wait_for_worker(worker: _Relay, socket_path: Path, timeout: float = 60.0) -> None:
    """Until the worker answers a status request on its socket, or fails."""
    from .worker_client import call_worker

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.child.poll() is not None:
            worker.reader.join(timeout=2)
            last = [x.strip() for x in worker.output if x.strip()][-2:]
            raise FedtuneError(f"the site worker stopped with exit code {worker.child.returncode}: {' / '.join(last)}")
        if socket_path.exists():
            try:
                call_worker(socket_path, "status", {}, timeout=10.0, connect_timeout=1.0)
                return
            except FedtuneError:
                pass
        time.sleep(0.2)
    raise FedtuneError(f"the site worker did not open {socket_path} within {timeout:.0f} s")


def run_site(supernode_cmd: list[str], key: Path, superlink: str, worker_cmd: list[str] | None = None,
             socket_path: Path | None = None, max_restarts: int = 5) -> None:
    """The site's one command: the worker (if any), then the SuperNode, in the foreground
    until the SuperNode exits or this process gets SIGTERM/SIGINT. A worker that dies is
    restarted (the next request waits for it); more than `max_restarts` deaths within a
    minute stop the site. An exit other than a requested stop is one line."""
    stopping = threading.Event()
    worker: _Relay | None = None
    supernode: _Relay | None = None

    def request_stop(*_: object) -> None:
        stopping.set()
        if supernode is not None and supernode.child.poll() is None:
            supernode.child.terminate()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    failure: str | None = None
    try:
        if worker_cmd is not None:
            assert socket_path is not None
            worker = _Relay(worker_cmd, "[worker] ")
            wait_for_worker(worker, socket_path)
            print(f"site: worker ready on {socket_path} (pid {worker.child.pid})", flush=True)
        supernode = _Relay(supernode_cmd)
        deaths: list[float] = []
        while supernode.child.poll() is None:
            time.sleep(0.5)
            if worker is not None and worker.child.poll() is not None and not stopping.is_set():
                deaths = [t for t in deaths if time.monotonic() - t < 60] + [time.monotonic()]
                if len(deaths) > max_restarts:
                    failure = f"the site worker died {len(deaths)} times within a minute; stopping the site"
                    request_stop()
                    break
                print(f"site: the worker (pid {worker.child.pid}) exited with code {worker.child.returncode}; "
                      f"restarting it", flush=True)
                worker = _Relay(worker_cmd or [], "[worker] ")
        code = supernode.child.wait()
        supernode.reader.join(timeout=2)
        stop_helpers(supernode.child.pid)
        if failure is None and code not in (0, -signal.SIGTERM, -signal.SIGINT) and not stopping.is_set():
            failure = explain_supernode_exit(code, "".join(supernode.output), key, superlink)
    finally:
        if supernode is not None:
            supernode.stop()
            stop_helpers(supernode.child.pid)
        if worker is not None:
            worker.stop()
    if failure:
        raise FedtuneError(failure)
