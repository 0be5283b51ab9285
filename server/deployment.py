"""The coordinator's side of a deployment with Flower's Deployment Engine: the CA and
the SuperLink's TLS certificate, site key pairs in the format SuperNode authentication
expects (EC P-384, OpenSSH), registration, and the exact `flower-superlink` and
`flwr run` command lines.

Folder layout (`--dir`, the coordinator's deployment folder):
    pki/ca.pem, pki/ca.key            the CA (give ca.pem to every site)
    pki/superlink.pem, .key           the SuperLink's TLS certificate
    sites/<name>/<name>.key, .pub     a site's key pair (the .key goes to that site only)
    flwr-home/config.toml             the `flwr` CLI's connection to this SuperLink
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

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
