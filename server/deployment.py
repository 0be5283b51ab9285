"""The coordinator's side of a deployment with Flower's Deployment Engine: the CA and
the SuperLink's TLS certificate, registration of the public keys sites send (each site
makes its own key pair: `client/deployment.py`), the exact `flower-superlink` and
`flwr run` command lines, and running the SuperLink on loopback behind its reverse
proxy (`reverse_proxy.py`). The coordinator never holds a site's private key.

Folder layout (`--dir`, the coordinator's deployment folder):
    pki/ca.pem, pki/ca.key            the CA (give ca.pem to every site)
    pki/superlink.pem, .key           the TLS certificate of the SuperLink and its proxy
    flwr-home/config.toml             the `flwr` CLI's connection to this SuperLink (loopback)
    proxy/nginx.conf, proxy/*.log     the reverse proxy's configuration, access and error logs
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedtune.child_process import Relay, stop_helpers
from fedtune.errors import FedtuneError
from fedtune.flower_env import child_env, tool
from fedtune.tls import create_ca, issue

CONNECTION = "fedtune"
LOOPBACK = "127.0.0.1"


def init_pki(deploy_dir: Path, hosts: Sequence[str]) -> tuple[Path, Path, Path]:
    """The CA (once) and the certificate for `hosts`, which the proxy shows the sites;
    it also names localhost and 127.0.0.1, where the coordinator's own tools and the proxy
    reach the SuperLink. A deployment folder that already has them is refused: sites trust
    that CA and certificate."""
    pki = deploy_dir / "pki"
    if (pki / "superlink.key").exists() or (pki / "ca.key").exists():
        raise FedtuneError(
            f"{pki}: already holds this deployment's CA and SuperLink key, which the sites trust; "
            f"refusing to replace them (use another --dir for a new deployment)"
        )
    ca = create_ca(pki, "fedtune deployment CA")
    names = list(dict.fromkeys([*hosts, "localhost", LOOPBACK]))
    cert, key = issue(pki, "superlink", names)
    return ca, cert, key


def write_connection(deploy_dir: Path, address: str) -> Path:
    """`flwr-home/config.toml`: the `fedtune` connection (TLS, our CA) for `flwr` commands."""
    home = deploy_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    ca = (deploy_dir / "pki" / "ca.pem").resolve()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca}"\n'
    )
    return home


def register_site(deploy_dir: Path, public_key: Path, address: str) -> str:
    """`flwr supernode register KEY.pub fedtune`; returns Flower's node id line. Refuses
    anything but an OpenSSH EC P-384 public key (a private key sent by mistake included)."""
    try:
        text = public_key.read_text(errors="replace")
    except OSError as err:
        raise FedtuneError(f"{public_key}: cannot read the site's public key ({err.strerror})") from None
    if "PRIVATE KEY" in text:
        raise FedtuneError(
            f"{public_key}: this is a private key; a site sends only its .pub file, and keeps the .key to itself"
        )
    if not text.startswith("ecdsa-sha2-nistp384 "):
        raise FedtuneError(f"{public_key}: not an OpenSSH EC P-384 public key (fedtune deploy site-key makes one)")
    home = write_connection(deploy_dir, address)
    out = subprocess.run(
        [tool("flwr"), "supernode", "register", str(public_key), CONNECTION],
        capture_output=True,
        text=True,
        env=child_env(home),
        timeout=120,
    )
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0 or "registered successfully" not in text:
        raise FedtuneError(f"{public_key}: registration with {address} failed: {flower_words(text)}")
    return next(line for line in text.splitlines() if "registered" in line).strip("✅ ").strip()


BOX = set("─━═│┃║╭╮╰╯┌┐└┘╔╗╚╝ ")


def flower_words(text: str, lines: int = 2) -> str:
    """What Flower's CLI said, without the box it draws around errors: its last meaningful lines."""
    said = [line.strip().strip("│┃║").strip() for line in text.splitlines()]
    said = [line for line in said if line and not set(line) <= BOX]
    return " ".join(said[-lines:]) or "no output"


def superlink_command(deploy_dir: Path, port: int, database: Path | None = None) -> list[str]:
    """The SuperLink on loopback only (TLS, SuperNode authentication, no runtime installs)."""
    pki = deploy_dir / "pki"
    cmd = [
        tool("flower-superlink"),
        "--ssl-ca-certfile",
        str(pki / "ca.pem"),
        "--ssl-certfile",
        str(pki / "superlink.pem"),
        "--ssl-keyfile",
        str(pki / "superlink.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
    ]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def wait_for_listener(child: Relay, port: int, what: str, timeout: float = 60.0) -> None:
    """Until 127.0.0.1:`port` accepts connections; one line if `child` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.child.poll() is not None:
            raise FedtuneError(f"{what} stopped with exit code {child.child.returncode}: {child.last_lines()}")
        try:
            socket.create_connection((LOOPBACK, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise FedtuneError(f"{what} did not listen on {LOOPBACK}:{port} within {timeout:.0f} s")


def run_superlink(
    superlink_cmd: list[str], superlink_port: int, proxy_cmd: list[str] | None, proxy_port: int | None
) -> None:
    """The coordinator's one command: the SuperLink on loopback, then its reverse proxy,
    in the foreground until either exits or this process gets SIGTERM/SIGINT; both (and
    Flower's detached helpers) are stopped then. An unexpected exit is one line."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    superlink: Relay | None = None
    proxy: Relay | None = None
    failure: str | None = None
    try:
        superlink = Relay(superlink_cmd)
        wait_for_listener(superlink, superlink_port, "the SuperLink")
        if proxy_cmd is not None and proxy_port is not None:
            proxy = Relay(proxy_cmd, "[proxy] ")
            wait_for_listener(proxy, proxy_port, "the reverse proxy (nginx)")
            print(
                f"superlink: sites connect to port {proxy_port} (Fleet API only, through nginx); Control and "
                f"ServerApp APIs on {LOOPBACK}:{superlink_port} only",
                flush=True,
            )
        while not stopping.is_set():
            for child, what in ((superlink, "the SuperLink"), (proxy, "the reverse proxy (nginx)")):
                if child is not None and child.child.poll() is not None:
                    failure = f"{what} stopped with exit code {child.child.returncode}: {child.last_lines()}"
                    stopping.set()
            stopping.wait(0.5)
    finally:
        if proxy is not None:
            proxy.stop()
        if superlink is not None:
            superlink.stop()
            stop_helpers(superlink.child.pid)
    if failure:
        raise FedtuneError(failure)


def check_connection(deploy_dir: Path) -> None:
    """The deployment folder has the `flwr` connection `register` writes."""
    if not (deploy_dir / "flwr-home" / "config.toml").is_file():
        raise FedtuneError(
            f"--dir {deploy_dir}: no flwr-home/config.toml there; run `fedtune deploy init` and "
            f"`fedtune deploy register` with this --dir first"
        )


def launch_run(
    deploy_dir: Path, app_dir: Path, name: str, config: Mapping[str, Any]
) -> tuple[Path, list[str], dict[str, str]]:
    """Record the run config a run is launched with (`DEPLOY/launched/NAME.toml`, what
    Flower's copy of the app gets) and return it with its `flwr run` command and env."""
    from fedtune.run_config_table import flat_table

    record = deploy_dir / "launched" / f"{name}.toml"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(flat_table(dict(sorted(config.items()))))
    cmd, env = run_command(deploy_dir, app_dir, [str(record.resolve())])
    return record, cmd, env


def run_command(deploy_dir: Path, app_dir: Path, run_config: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """`flwr run APP fedtune --stream` with this deployment's connection (made by `register`)."""
    check_connection(deploy_dir)
    cmd = [tool("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    for item in run_config:
        cmd += ["--run-config", item]
    return cmd, child_env(deploy_dir / "flwr-home")
