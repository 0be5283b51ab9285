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
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.child_process import Relay, stop_helpers
from fedtune.data import load_classification, load_completions
from fedtune.errors import FedtuneError

from .node_settings import NodeSettings
from .site_policy import SitePolicy

UNREGISTERED_KEY = "[code: 2004]"  # flower-supernode: "[code: 2004] Failed to activate SuperNode."


def check_tls(superlink: str, ca: Path, timeout: float = 10.0, client_tls: tuple[Path, Path] | None = None) -> None:
    """Connect to the SuperLink (its proxy) and verify its certificate against `ca`,
    presenting the site's client certificate if it has one."""
    host, _, port = superlink.rpartition(":")
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError) as err:
        raise FedtuneError(f"{ca}: not a usable CA certificate ({err})") from None
    if client_tls is not None:
        try:
            context.load_cert_chain(str(client_tls[0]), str(client_tls[1]))
        except (ssl.SSLError, OSError) as err:
            raise FedtuneError(
                f"{client_tls[0]}: this client certificate and {client_tls[1].name} are not a usable "
                f"pair ({getattr(err, 'reason', None) or err})"
            ) from None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                # nginx answers a request without the client certificate it requires with 400.
                tls.sendall(f"GET /v1/fleet/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                answer = tls.recv(4096).decode("latin-1")
                while "</html>" not in answer and len(answer) < 8192:
                    more = tls.recv(4096).decode("latin-1")
                    if not more:
                        break
                    answer += more
    except ssl.SSLCertVerificationError as err:
        raise FedtuneError(
            f"{ca}: the SuperLink at {superlink} presents a certificate this CA did not sign "
            f"({err.verify_message}); ask the coordinator for the right ca.pem"
        ) from None
    except ssl.SSLError as err:
        if "CERTIFICATE" in str(err.reason or "").upper() and client_tls is not None:
            raise FedtuneError(
                f"{client_tls[0]}: the proxy at {superlink} refused this site's client certificate "
                f"({err.reason}); ask the coordinator to sign this site's .csr"
            ) from None
        raise FedtuneError(f"{superlink}: TLS handshake failed ({err.reason}); is it a TLS SuperLink?") from None
    except OSError as err:
        raise FedtuneError(f"{superlink}: cannot connect ({err.strerror or err})") from None
    if "No required SSL certificate" in answer:
        raise FedtuneError(
            f"{superlink}: the coordinator's proxy requires a client certificate; run "
            f"`fedtune deploy site-key`, send the .csr, and pass --client-cert and --client-key"
        )
    if "SSL certificate error" in answer:
        raise FedtuneError(
            f"{superlink}: the coordinator's proxy refused this site's client certificate; ask "
            f"the coordinator to sign this site's .csr (fedtune deploy sign)"
        )


def check_site_data(
    data: Path, task: str, text_field: str, label_field: str, prompt_field: str, completion_field: str
) -> int:
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
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path.write_bytes(public + f" {site}\n".encode())
    return private_path, public_path


def supernode_command(
    superlink: str,
    ca: Path,
    key: Path,
    port: int,
    node_config: str,
    max_retries: int | None = None,
    idle_poll: float = 3.0,
    client_tls: tuple[Path, Path] | None = None,
    allow_apps: Sequence[str] = (),
) -> list[str]:
    """`flower-supernode` with TLS, the site's key and node config, run through
    `supernode_launcher.py`: it logs the hash of every app the site is asked to run and
    refuses those not in `allow_apps` (when given), shortens Flower's 3 s idle poll, and
    presents a client certificate and key (`client_tls`) to a proxy that requires one."""
    launcher = [sys.executable, "-m", f"{__package__}.supernode_launcher", "--idle-poll", str(min(idle_poll, 3.0))]
    if client_tls is not None:
        launcher += ["--client-cert", str(client_tls[0].resolve()), "--client-key", str(client_tls[1].resolve())]
    for digest in allow_apps:
        launcher += ["--allow-app", digest]
    cmd = [
        *launcher,
        "--",
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        node_config,
        "--port",
        str(port),
    ]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def worker_node_config(socket_path: Path) -> str:
    """A SuperNode's node config with a site worker: the socket, nothing else (the worker
    owns the site's data path, state folder, name and floor)."""
    return NodeSettings("worker", worker_socket=str(socket_path.resolve())).supernode_flag()


def in_process_node_config(policy: SitePolicy) -> str:
    """A SuperNode's node config without a worker (`--no-worker`): the ClientApp reads the
    data and enforces the floor itself, so the coordinator's code could change both."""
    return policy.node_settings().supernode_flag()


def explain_supernode_exit(code: int, output: str, key: Path, superlink: str) -> str:
    if UNREGISTERED_KEY in output:
        return (
            f"{key}: this site's key is not registered with the SuperLink at {superlink}; send "
            f"{key.with_suffix('.pub').name} to the coordinator (fedtune deploy register)"
        )
    last = [line for line in output.splitlines() if line.strip()][-3:]
    return f"the SuperNode stopped with exit code {code}: {' / '.join(x.strip() for x in last)}"


def worker_command(
    socket_path: Path,
    policy: SitePolicy,
    threads: int = 0,
    idle_timeout: float = 1800.0,
    socket_group: int | None = None,
    device: str = "auto",
    devices: int = 1,
) -> list[str]:
    """The site worker with the site's policy on its own command line (`fedtune deploy worker`)."""
    cmd = [
        sys.executable,
        "-m",
        "fedtune.cli",
        "deploy",
        "worker",
        "--socket",
        str(socket_path),
        "--idle-timeout",
        str(idle_timeout),
        *policy_arguments(policy),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    if socket_group is not None:
        cmd += ["--socket-group", str(socket_group)]
    if device != "auto":
        cmd += ["--device", device]
    if devices > 1:
        cmd += ["--devices", str(devices)]
    return cmd


def policy_arguments(policy: SitePolicy) -> list[str]:
    """`deploy worker` flags that give a worker `policy`."""
    floor = policy.floor
    args = [
        "--data",
        str(policy.data_path.resolve()),
        "--name",
        policy.name,
        "--state-dir",
        str(policy.state_dir.resolve()),
        "--min-secagg-sites",
        str(policy.min_secagg_sites),
    ]
    if floor.require_secagg:
        args.append("--require-secagg")
    if floor.max_epsilon > 0:
        args += ["--max-epsilon", repr(floor.max_epsilon)]
    if floor.max_delta > 0:
        args += ["--max-delta", repr(floor.max_delta)]
    if floor.own_noise_only:
        args.append("--own-noise-only")
    for uid in policy.allowed_uids:
        args += ["--allow-uid", str(uid)]
    if policy.val_fraction is not None:
        args += ["--val-fraction", repr(policy.val_fraction)]
    if policy.gate_registry and policy.gate_trust_key is not None:
        args += ["--gate-registry", policy.gate_registry, "--gate-trust-key", str(policy.gate_trust_key.resolve())]
    if policy.gate_registry_ca is not None:
        args += ["--gate-registry-ca", str(policy.gate_registry_ca.resolve())]
    if policy.reveal_gate_drop:
        args.append("--reveal-gate-drop")
    if policy.lora_rank:
        args += ["--lora-rank", str(policy.lora_rank)]
    if policy.peers_dir is not None and policy.identity_key is not None:
        args += ["--peers", str(policy.peers_dir.resolve()), "--identity-key", str(policy.identity_key.resolve())]
        args += ["--max-colluders", str(policy.max_colluders)]
    return args


def wait_for_worker(worker: Relay, socket_path: Path, timeout: float = 60.0) -> None:
    """Until the worker answers a status request on its socket, or fails."""
    from .worker_client import call_worker

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.child.poll() is not None:
            raise FedtuneError(
                f"the site worker stopped with exit code {worker.child.returncode}: {worker.last_lines()}"
            )
        if socket_path.exists():
            try:
                call_worker(socket_path, "status", {}, timeout=10.0, connect_timeout=1.0)
                return
            except FedtuneError:
                pass
        time.sleep(0.2)
    raise FedtuneError(f"the site worker did not open {socket_path} within {timeout:.0f} s")


def run_site(
    supernode_cmd: list[str],
    key: Path,
    superlink: str,
    worker_cmd: list[str] | None = None,
    socket_path: Path | None = None,
    max_restarts: int = 5,
    supernode_user: tuple[int, int] | None = None,
    supernode_env: dict[str, str] | None = None,
) -> None:
    """The site's one command: the worker (if any), then the SuperNode, in the foreground
    until the SuperNode exits or this process gets SIGTERM/SIGINT. A worker that dies is
    restarted (the next request waits for it); more than `max_restarts` deaths within a
    minute stop the site. An exit other than a requested stop is one line. With
    `supernode_user` (uid, gid) the SuperNode, and every ClientApp process it starts, runs
    as that account."""
    stopping = threading.Event()
    worker: Relay | None = None
    supernode: Relay | None = None

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
            worker = Relay(worker_cmd, "[worker] ")
            wait_for_worker(worker, socket_path)
            print(f"site: worker ready on {socket_path} (pid {worker.child.pid})", flush=True)
        supernode = Relay(supernode_cmd, env=supernode_env, user=supernode_user)
        deaths: list[float] = []
        while supernode.child.poll() is None:
            time.sleep(0.5)
            if worker is not None and worker.child.poll() is not None and not stopping.is_set():
                deaths = [t for t in deaths if time.monotonic() - t < 60] + [time.monotonic()]
                if len(deaths) > max_restarts:
                    failure = f"the site worker died {len(deaths)} times within a minute; stopping the site"
                    request_stop()
                    break
                print(
                    f"site: the worker (pid {worker.child.pid}) exited with code {worker.child.returncode}; "
                    f"restarting it",
                    flush=True,
                )
                worker = Relay(worker_cmd or [], "[worker] ")
        code = supernode.child.wait()
        supernode.reader.join(timeout=2)
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
