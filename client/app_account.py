"""Privilege separation at a site: the SuperNode, and so every ClientApp process Flower
starts for the coordinator's code, runs as a service account of its own, which can read
neither the site's data, nor the worker's state, nor its configuration; the site worker
runs as the data owner and admits only that account on its socket.

`fedtune deploy site`, started as root, creates the account if it is missing, gives it a
home of its own (Flower's state, a copy of the CA, the SuperNode key and the TLS client
pair: what the SuperNode itself must read), and checks, as that account, that the data
file and the state folder are out of its reach before anything starts."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import FedtuneError

DEFAULT_APP_USER = "fedtune-app"
DEFAULT_APP_HOME = Path("/var/lib/fedtune-app")


@dataclass(frozen=True)
class AppAccount:
    """The account the SuperNode and its ClientApp processes run as."""

    name: str
    uid: int
    gid: int

    def run(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`cmd` as this account (no supplementary groups); a program it cannot start is exit 126."""
        try:
            return subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                user=self.uid,
                group=self.gid,
                extra_groups=[],
                env=env,
                timeout=120,
                cwd="/",
            )
        except OSError as err:
            return subprocess.CompletedProcess(cmd, 126, "", f"{err.filename or cmd[0]}: {err.strerror or err}")


def app_account(name: str, create: bool = True) -> AppAccount:
    """The service account `name`, created (system account, own group, no login) if missing."""
    if os.geteuid() != 0:
        raise FedtuneError(
            f"--app-user {name}: running the SuperNode as another account needs root; start "
            f"`fedtune deploy site` as root, or use the two-account layout of docs/deployment.md"
        )
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create:
            raise FedtuneError(f"--app-user {name}: no such account") from None
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        made = subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise FedtuneError(
                f"--app-user {name}: could not create the account ({made.stderr.strip() or made.returncode})"
            ) from None
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise FedtuneError(f"--app-user {name}: is root; the ClientApp account must be an unprivileged one")
    if entry.pw_uid == os.getuid():
        raise FedtuneError(f"--app-user {name}: is the account the worker runs as; it must be another one")
    return AppAccount(name, entry.pw_uid, entry.pw_gid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@dataclass(frozen=True)
class AppHome:
    """The account's folders: `root` (the worker's user, 0755) holds `home` (the account's,
    0700: Flower's state and what the SuperNode reads) and `worker` (the socket folder)."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def socket(self) -> Path:
        return self.root / "worker" / "worker.sock"


def prepare_app_home(root: Path, account: AppAccount, files: dict[str, Path]) -> tuple[AppHome, dict[str, Path]]:
    """Make `root` and copy `files` (name -> path: CA, SuperNode key, TLS pair) into the
    account's home, owned by it; returns the home and where each copy lies."""
    root = root.resolve()
    for parent in (root, *root.parents):
        if parent.exists():
            info = parent.stat()
            sticky = bool(info.st_mode & 0o1000)  # /tmp: others cannot rename or remove what is ours
            if info.st_uid not in (0, os.getuid()) or (info.st_mode & 0o022 and not sticky):
                raise FedtuneError(
                    f"--app-home {root}: {parent} is writable by another account or owned by one; "
                    f"choose a folder under a root-owned path such as {DEFAULT_APP_HOME}"
                )
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    root.chmod(0o755)
    home = AppHome(root)
    home.home.mkdir(mode=0o700, exist_ok=True)
    os.chown(home.home, account.uid, account.gid)
    home.home.chmod(0o700)
    copies: dict[str, Path] = {}
    for name, source in files.items():
        target = home.home / name
        tmp = target.with_name(f".{name}.tmp")
        shutil.copyfile(source, tmp)
        os.chown(tmp, account.uid, account.gid)
        tmp.chmod(0o600)
        os.replace(tmp, target)
        copies[name] = target
    return home, copies


def check_out_of_reach(account: AppAccount, paths: dict[str, Path]) -> None:
    """Refuse to start if `account` can read any of `paths` (what -> path), checked as it."""
    for what, path in paths.items():
        probe = account.run(["test", "-r", str(path.resolve())])
        if probe.returncode == 0:
            raise FedtuneError(
                f"{path}: the ClientApp account {account.name!r} can read this {what}; make it "
                f"readable by the site's own account only (e.g. chmod o-rwx and a private parent "
                f"folder) so that the coordinator's code cannot"
            )


def check_can_start(account: AppAccount, env: dict[str, str]) -> None:
    """The account can run this interpreter and import the SuperNode launcher."""
    probe = account.run([sys.executable, "-c", "import fedtune.client.supernode_launcher, flwr"], env=env)
    if probe.returncode != 0:
        last = [x for x in probe.stderr.splitlines() if x.strip()][-1:] or [f"exit {probe.returncode}"]
        raise FedtuneError(
            f"the ClientApp account {account.name!r} cannot run {sys.executable} with fedtune and "
            f"Flower ({last[0].strip()}); install Python and fedtune where that account can read "
            f"them (e.g. /opt), or let it traverse the folders on the way (setfacl -m "
            f"u:{account.name}:x FOLDER)"
        )
