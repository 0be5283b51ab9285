"""The coordinator's side of a deployment with Flower's Deployment Engine: the CA and
the SuperLink's TLS certificate, registration of the public keys sites send (each site
makes its own key pair: `client/deployment.py`), and the exact `flower-superlink` and
`flwr run` command lines. The coordinator never holds a site's private key.

Folder layout (`--dir`, the coordinator's deployment folder):
    pki/ca.pem, pki/ca.key            the CA (give ca.pem to every site)
    pki/superlink.pem, .key           the SuperLink's TLS certificate
    flwr-home/config.toml             the `flwr` CLI's connection to this SuperLink
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Sequence


from fedtune.errors import FedtuneError
from fedtune.flower_env import child_env, tool
from fedtune.tls import create_ca, issue

CONNECTION = "fedtune"


def init_pki(deploy_dir: Path, hosts: Sequence[str]) -> tuple[Path, Path, Path]:
    """The CA (once) and the SuperLink's certificate for `hosts`."""
    pki = deploy_dir / "pki"
    ca = create_ca(pki, "fedtune deployment CA")
    cert, key = issue(pki, "superlink", list(hosts))
    return ca, cert, key


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
    """`flwr supernode register KEY.pub fedtune`; returns Flower's node id line. Refuses
    anything but an OpenSSH EC P-384 public key (a private key sent by mistake included)."""
    try:
        text = public_key.read_text(errors="replace")
    except OSError as err:
        raise FedtuneError(f"{public_key}: cannot read the site's public key ({err.strerror})") from None
    if "PRIVATE KEY" in text:
        raise FedtuneError(f"{public_key}: this is a private key; a site sends only its .pub file, and keeps the "
                           f".key to itself")
    if not text.startswith("ecdsa-sha2-nistp384 "):
        raise FedtuneError(f"{public_key}: not an OpenSSH EC P-384 public key (fedtune deploy site-key makes one)")
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
