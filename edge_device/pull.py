"""The device side of the registry: pull a bundle, resume interrupted downloads,
verify it, switch `current` atomically, keep the previous version, roll back.

Before downloading anything, the device checks the version's signed release record
(`release.py`): it must name the model asked for and the version served, and a sequence
above the active version's; an older release is taken only with `allow_rollback`.

An adapter update (`kind: adapter`) is a version like any other; it is refused before any
download unless the base bundle it names is already under versions/, where the runtime
then finds it.

Layout under the device folder (`--into`):
    versions/<version>/        verified bundles
    .incoming/<version>/       a download in progress (partial files are resumed)
    current  -> versions/<v>   the active bundle (a symlink, switched with os.replace)
    previous -> versions/<u>   the one before it
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedtune.errors import FedtuneError
from fedtune.registry.protocol import StoreError, check_name, open_channel
from fedtune.registry.v1 import registry_pb2 as pb
from fedtune.registry.v1 import registry_pb2_grpc as rpc

from .bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    bundle_kind,
    find_base,
    sha256_bytes,
    verify_bundle,
)
from .release import (
    RELEASE_FILE,
    RELEASE_SIGNATURE_FILE,
    Release,
    ReleaseError,
    check_release_fits,
    parse_release,
    read_release,
)
from .signature import load_public_key, verify

CURRENT, PREVIOUS = "current", "previous"


class PullError(FedtuneError):
    """The pull failed; the active version is unchanged."""


class PullInterrupted(PullError):
    """The download stopped part-way; the next pull resumes from the partial files."""


@dataclass(frozen=True)
class PullResult:
    model: str
    version: str
    path: Path
    downloaded_bytes: int  # bytes received in this pull
    resumed_bytes: int  # bytes already on disk from an earlier, interrupted pull
    activated: bool


def _rpc_error(registry: str, what: str, err: grpc.RpcError) -> PullError:
    return PullError(f"{registry}: {what}: {err.code().name}: {err.details()}")


def pull(
    registry: str,
    model: str,
    trusted_key: str | Path,
    into: str | Path,
    *,
    version: str = "",
    ca: bytes | None = None,
    cert: bytes | None = None,
    key: bytes | None = None,
    timeout: float = 600.0,
    allow_rollback: bool = False,
    candidate: bool = False,
) -> PullResult:
    """Download `model` (`version`, or the latest), verify it, and make it current.
    A download that breaks off part-way keeps what it received and raises
    PullInterrupted; the next pull resumes from there. A release older than the active
    one is refused unless `allow_rollback`. A release candidate is refused unless
    `candidate` (a site scoring it for the gate)."""
    root = Path(into)
    public_key = load_public_key(trusted_key)
    with open_channel(registry, ca, cert, key) as channel:
        stub = rpc.ModelRegistryStub(channel)
        try:
            reply = stub.GetManifest(pb.GetManifestRequest(model=model, version=version), timeout=timeout)
        except grpc.RpcError as err:
            raise _rpc_error(registry, f"manifest of {model} {version or '(latest)'}", err) from None
        try:
            check_name("version", reply.version)
        except StoreError as err:
            raise PullError(f"{registry}: {err}") from None
        what = f"{registry} {model} {reply.version}"
        verify(public_key, reply.manifest, reply.signature, f"{what} manifest")
        try:
            release = parse_release(
                reply.release, reply.release_signature, public_key, sha256_bytes(reply.manifest), what
            )
            check_release_fits(release, model, reply.version, what, candidate)
        except ReleaseError as err:
            raise PullError(f"refused: {err}") from None
        _require_newer(root, release, public_key, allow_rollback, what)
        final = root / "versions" / reply.version
        manifest = json.loads(reply.manifest)
        if bundle_kind(manifest) == "adapter":
            _require_base(root, manifest, f"{registry} {model} {reply.version}")
        if final.exists():
            verify_bundle(final, trusted_key)
            _activate(root, reply.version)
            return PullResult(model, reply.version, final, 0, 0, True)
        incoming = root / ".incoming" / reply.version
        incoming.mkdir(parents=True, exist_ok=True)
        (incoming / MANIFEST_FILE).write_bytes(reply.manifest)
        (incoming / SIGNATURE_FILE).write_bytes(reply.signature)
        (incoming / RELEASE_FILE).write_bytes(reply.release)
        (incoming / RELEASE_SIGNATURE_FILE).write_bytes(reply.release_signature)
        received = resumed = 0
        for name, entry in sorted(manifest["files"].items()):
            try:
                check_name("file", name)
            except StoreError as err:
                raise PullError(f"{registry}: manifest of {model} {reply.version}: {err}") from None
            part = incoming / name
            have = part.stat().st_size if part.exists() else 0
            if have > entry["bytes"]:
                part.unlink()
                have = 0
            resumed += have
            if have == entry["bytes"]:
                continue
            request = pb.DownloadRequest(model=model, version=reply.version, file=name, offset=have)
            stream = stub.Download(request, timeout=timeout)
            try:
                with open(part, "ab") as handle:
                    for chunk in stream:
                        if chunk.offset != handle.tell():
                            raise PullError(f"{registry}: {name}: chunk at {chunk.offset}, expected {handle.tell()}")
                        if handle.tell() + len(chunk.data) > entry["bytes"]:
                            stream.cancel()
                            handle.close()
                            part.unlink()
                            raise PullError(
                                f"refused {model} {reply.version} from {registry}: {name}: the registry "
                                f"sent more than the signed manifest's {entry['bytes']} bytes"
                            )
                        handle.write(chunk.data)
                        received += len(chunk.data)
            except grpc.RpcError as err:
                if received or resumed:
                    raise PullInterrupted(
                        f"{registry}: download of {model} {reply.version} cut after {received} bytes "
                        f"({err.code().name}); pull again to resume"
                    ) from None
                raise _rpc_error(registry, f"download {name}", err) from None
    try:
        verify_bundle(incoming, trusted_key)
    except BundleError as err:
        shutil.rmtree(incoming, ignore_errors=True)  # start clean next time; `current` is untouched
        raise PullError(f"refused {model} {reply.version} from {registry}: {err}") from None
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(incoming, final)
    _activate(root, reply.version)
    return PullResult(model, reply.version, final, received, resumed, True)


def active_release(root: Path, public_key: object) -> Release | None:
    """The signed release record of the active version, if any (a version pulled before
    releases existed has none)."""
    current = root / CURRENT
    if not current.is_symlink():
        return None
    try:
        manifest_raw = (current / MANIFEST_FILE).read_bytes()
        return read_release(current, public_key, sha256_bytes(manifest_raw))  # type: ignore[arg-type]
    except (OSError, ReleaseError):
        return None


def _require_newer(root: Path, release: Release, public_key: object, allow_rollback: bool, what: str) -> None:
    """Refuse a release whose sequence is not above the active one's (the same release
    again is fine), unless the user asked for a rollback."""
    active = active_release(root, public_key)
    if active is None or allow_rollback or release == active or release.sequence > active.sequence:
        return
    raise PullError(
        f"refused {what}: release sequence {release.sequence} is not newer than the active "
        f"{active.version}'s {active.sequence} (a downgrade); pass --allow-rollback to go back on purpose"
    )


def _require_base(root: Path, manifest: dict[str, Any], what: str) -> None:
    """An adapter update is refused before any download unless its base bundle is here."""
    versions = root / "versions"
    held = sorted(p for p in versions.iterdir() if p.is_dir()) if versions.is_dir() else []
    if find_base(manifest["base_bundle"]["manifest_sha256"], held) is None:
        raise PullError(
            f"refused {what}: an adapter for base bundle "
            f"{manifest['base_bundle']['manifest_sha256'][:16]}, which this device does not hold; "
            "pull that base first"
        )


def _point(root: Path, link: str, version: str) -> None:
    """Atomically make `root/link` point at versions/<version>."""
    tmp = root / f".{link}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path("versions") / version, tmp)
    os.replace(tmp, root / link)


def active_version(root: str | Path, link: str = CURRENT) -> str | None:
    path = Path(root) / link
    return Path(os.readlink(path)).name if path.is_symlink() else None


def _activate(root: Path, version: str) -> None:
    current = active_version(root)
    if current == version:
        return
    _point(root, CURRENT, version)
    if current is not None:
        _point(root, PREVIOUS, current)


def rollback(into: str | Path) -> str:
    """Make the previous version current again (and the current one previous)."""
    root = Path(into)
    current, previous = active_version(root), active_version(root, PREVIOUS)
    if previous is None:
        raise PullError(f"{root}: no previous version to roll back to")
    _point(root, CURRENT, previous)
    if current is not None:
        _point(root, PREVIOUS, current)
    return previous
