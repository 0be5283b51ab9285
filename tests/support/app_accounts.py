"""A service account for a site's SuperNode in tests (privilege separation), made with
the product's own `app_account`, and the traverse-only ACLs it needs to start this
interpreter where that lives under a private folder (pyenv under /root): granted for the
session, removed after."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fedtune.client.app_account import AppAccount, app_account

TEST_APP_USER = "fedtune-test-app"


def _needs_traverse(account: AppAccount, targets: list[Path]) -> list[Path]:
    folders: list[Path] = []
    for target in targets:
        for folder in reversed(target.parents):
            if folder not in folders and account.run(["test", "-x", str(folder)]).returncode != 0:
                folders.append(folder)
    return folders


def grant_traverse(account: AppAccount) -> list[Path]:
    """Give `account` traverse (x) on each folder on the way to this interpreter and this
    checkout that it cannot pass; returns them, for `revoke_traverse`."""
    targets = [Path(sys.executable).resolve(), Path(sys.executable), Path(__file__).resolve()]
    folders = _needs_traverse(account, targets)
    if folders and shutil.which("setfacl") is None:
        raise RuntimeError(f"{account.name} cannot reach {folders[0]} and setfacl is missing (apt-get install acl)")
    for folder in folders:
        subprocess.run(["setfacl", "-m", f"u:{account.name}:x", str(folder)], check=True)
    return folders


def revoke_traverse(account: AppAccount, folders: list[Path]) -> None:
    for folder in folders:
        subprocess.run(["setfacl", "-x", f"u:{account.name}", str(folder)], check=False)


def site_app_account() -> AppAccount:
    return app_account(TEST_APP_USER)


def app_home_root() -> Path:
    """A folder for the account's home and the worker's socket: root-owned, 0755, under /tmp."""
    root = Path(tempfile.mkdtemp(prefix="ftapp-", dir="/tmp"))
    root.chmod(0o755)
    return root
