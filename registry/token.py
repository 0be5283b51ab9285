"""The coordinator's publish token: a random bearer secret in a 0600 file that is
never overwritten, and reading it back for `serve` and `publish`."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.tls import read_pem


def create_token(path: str | Path) -> Path:
    """Write a new token to `path` (mode 0600); refuses to overwrite one."""
    out = Path(path)
    if out.exists():
        raise FedtuneError(f"{out}: already exists; refusing to overwrite a token")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return out


def read_token(path: str | Path) -> str:
    """The token in `path`; an empty or missing file is one line."""
    token = (read_pem(str(path), "token") or b"").decode().strip()
    if not token:
        raise FedtuneError(f"{path}: token file is empty")
    return token
