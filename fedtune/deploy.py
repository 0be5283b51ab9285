"""Operator commands for a real multi-site deployment with Flower's Deployment Engine:
a CA and the SuperLink's TLS certificate, site key pairs in the format SuperNode
authentication expects (EC P-384, OpenSSH), registration, and the exact
`flower-superlink` / `flower-supernode` / `flwr run` command lines, with pre-flight
checks that turn a bad data file, a wrong CA or an unregistered key into one line.

Folder layout (`--dir`, the coordinator's deployment folder):
    pki/ca.pem, pki/ca.key            the CA (give ca.pem to every site)
    pki/superlink.pem, .key           the SuperLink's TLS certificate
    sites/<name>/<name>.key, .pub     a site's key pair (the .key goes to that site only)
    flwr-home/config.toml             the `flwr` CLI's connection to this SuperLink
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.errors import FedtuneError
from fedtune.tls import create_ca, issue

CONNECTION = "fedtune"
# flower-supernode prints "[code: 2004] Failed to activate SuperNode." for an unregistered key.


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
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
                "RAY_USAGE_STATS_ENABLED": "0"})
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


# ---- coordinator ---------------------------------------------------------------------
def init_pki(deploy_dir: Path, hosts: Sequence[str]) -> tuple[Path, Path, Path]:
    """The CA (once) and the SuperLink's certificate for `hosts`."""
    pki = deploy_dir / "pki"
    ca = create_ca(pki, "fedtune deployment CA")
    cert, key = issue(pki, "superlink", list(hosts))
    return ca, cert, key


def site_keypair(deploy_dir: Path, site: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format for one site (never overwritten)."""
    folder = deploy_dir / "sites" / site
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


def write_connection(deploy_dir: Path, address: str) -> Path:
    """`flwr-home/config.toml`: the `fedtune` connection (TLS, our CA) for `flwr` commands."""
    home = deploy_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    ca = (deploy_dir / "pki" / "ca.pem").resolve()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca}"\n')
    return home


def register_site(deploy_dir: Path, public_key: Path, address: str) -> str:
    """`flwr supernode register KEY.pub fedtune`; returns Flower's node id line."""
    home = write_connection(deploy_dir, address)
    out = subprocess.run([tool("flwr"), "supernode", "register", str(public_key), CONNECTION],
                         capture_output=True, text=True, env=child_env(home), timeout=120)
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0 or "registered successfully" not in text:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        raise FedtuneError(f"{public_key}: registration with {address} failed: {last[0].strip()}")
    return next(line for line in text.splitlines() if "registered" in line).strip("✅ ").strip()


def superlink_command(deploy_dir: Path, host: str, port: int, database: Path | None = None) -> list[str]:
    pki = deploy_dir / "pki"
    cmd = [tool("flower-superlink"), "--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile",
           str(pki / "superlink.pem"), "--ssl-keyfile", str(pki / "superlink.key"), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def run_command(deploy_dir: Path, app_dir: Path, run_config: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    cmd = [tool("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    for item in run_config:
        cmd += ["--run-config", item]
    return cmd, child_env(deploy_dir / "flwr-home")


# ---- site ----------------------------------------------------------------------------
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
    from fedtune.data import load_classification, load_completions

    if task == "seq-cls":
        return len(load_classification(data, text_field, label_field, None))
    return len(load_completions(data, prompt_field, completion_field))


def supernode_command(superlink: str, ca: Path, key: Path, data: Path, port: int, state_dir: Path,
                      max_retries: int | None = None, site_name: str = "") -> list[str]:
    node_config = f'data-path="{data.resolve()}" state-dir="{state_dir.resolve()}" site-name="{site_name or data.stem}"'
    cmd = [tool("flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca),
           "--auth-supernode-private-key", str(key), "--node-config", node_config, "--port", str(port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def stop_helpers(pid: int) -> None:
    """Stop the helpers Flower detaches from a process (they carry `--parent-pid PID`)."""
    subprocess.run(["pkill", "-TERM", "-f", f"[-]-parent-pid {pid}( |$)"], capture_output=True)


def explain_supernode_exit(code: int, output: str, key: Path, superlink: str) -> str:
    if "[code: 2004]" in output:
        return (f"{key}: this site's key is not registered with the SuperLink at {superlink}; send "
                f"{key.with_suffix('.pub').name} to the coordinator (fedtune deploy register)")
    last = [line for line in output.splitlines() if line.strip()][-3:]
    return f"the SuperNode stopped with exit code {code}: {' / '.join(x.strip() for x in last)}"


# ---- process management (tests, benchmarks, local demos) -------------------------------
class ManagedProcesses:
    """Starts Flower's processes in their own sessions, logging to files, and stops
    every one of them, and the helpers Flower detaches from them, by PID."""

    def __init__(self, logs: Path, cwd: Path | None = None) -> None:
        self.logs = logs
        self.cwd = cwd
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, env=env or child_env(),
                                start_new_session=True)
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
                raise FedtuneError(f"process exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
    raise FedtuneError(f"port {port} never opened: {log.read_text(errors='replace')[-2000:]}")
