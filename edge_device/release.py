"""A bundle's signed release record: `release.json` + `release.sig` beside the manifest.
The record names the model, the version, a sequence number that only grows along a
model's releases, and the sha256 of the manifest it releases; it is signed with the
same Ed25519 key as the manifest. The manifest itself stays as exported, so adapter
updates keep naming their base bundle by its manifest's sha256.

A record's `channel` is "release" (what devices run) or "candidate" (a bundle the sites
score on their own data before any device gets it: `fedtune gate`); it is signed, so no
registry can turn a candidate into a release. A promoted release names the gate's result.

A device checks a record before it downloads anything: the trusted key's signature, the
manifest's sha256, the model it asked for, the version the registry says it serves, its
channel, and a sequence above the active version's unless the user asks for a rollback.
Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.errors import FedtuneError
from fedtune.registry.protocol import StoreError, check_name

from .signature import SignatureError, verify

RELEASE_FILE = "release.json"
RELEASE_SIGNATURE_FILE = "release.sig"
RELEASE_FORMAT = "fedtune-release/1"
CHANNELS = ("release", "candidate")
CANDIDATE_SUFFIX = ".candidate"  # candidates are published under MODEL.candidate, never under MODEL


def candidate_model(model: str) -> str:
    """The registry name a model's candidates are published under."""
    return model + CANDIDATE_SUFFIX


class ReleaseError(FedtuneError):
    """A release record that is missing, unsigned, or does not fit what was asked for."""


@dataclass(frozen=True)
class Release:
    """What a signed release record states."""

    model: str
    version: str
    sequence: int
    manifest_sha256: str
    channel: str = "release"
    gate: str = ""  # a promoted release: the site gate's result, one line

    def to_bytes(self) -> bytes:
        """The exact bytes of release.json (and what is signed)."""
        fields = {k: v for k, v in asdict(self).items() if k != "gate" or v}
        return (json.dumps({"format": RELEASE_FORMAT, **fields}, indent=2, sort_keys=True) + "\n").encode()


def check_release_names(model: str, version: str) -> None:
    """The model and version names a registry accepts, or one line."""
    try:
        check_name("model", model)
        check_name("version", version)
    except StoreError as err:
        raise ReleaseError(str(err)) from None


def parse_release(
    raw: bytes, signature: bytes, public_key: Ed25519PublicKey, manifest_sha256: str, what: str
) -> Release:
    """The record in `raw`, once its signature checks out against `public_key` and it
    names the manifest whose sha256 is `manifest_sha256`. Raises ReleaseError."""
    if not raw:
        raise ReleaseError(
            f"{what}: no signed release record (model, version, sequence); the coordinator "
            f"releases a bundle with `fedtune release` before publishing it"
        )
    try:
        verify(public_key, raw, signature, f"{what} release record")
    except SignatureError as err:
        raise ReleaseError(str(err)) from None
    try:
        record = json.loads(raw)
        if record.get("format") != RELEASE_FORMAT:
            raise ValueError(f"field 'format': expected {RELEASE_FORMAT!r}, got {record.get('format')!r}")
        release = Release(
            str(record["model"]),
            str(record["version"]),
            int(record["sequence"]),
            str(record["manifest_sha256"]),
            str(record.get("channel", "release")),
            str(record.get("gate", ""))[:500],
        )
        if release.channel not in CHANNELS:
            raise ValueError(f"field 'channel': expected one of {CHANNELS}, got {release.channel[:40]!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise ReleaseError(f"{what}: release record malformed ({err})") from None
    if release.manifest_sha256 != manifest_sha256:
        raise ReleaseError(
            f"{what}: the release record is for another manifest (sha256 "
            f"{release.manifest_sha256[:16]}, this one {manifest_sha256[:16]})"
        )
    return release


def check_release_fits(release: Release, model: str, version: str, what: str, candidate: bool = False) -> None:
    """Refuse a record signed for another model name or another version, and a candidate
    unless `candidate` (a site scoring it; devices never)."""
    if release.channel == "candidate" and not candidate:
        raise ReleaseError(
            f"{what}: a release candidate, not a release: devices run only what the sites' gate promoted"
        )
    if release.model != model:
        raise ReleaseError(f"{what}: signed for model {release.model!r}, not {model!r}")
    if release.version != version:
        raise ReleaseError(
            f"{what}: signed as version {release.version!r} (sequence {release.sequence}), served as {version!r}"
        )


def read_release(bundle: Path, public_key: Ed25519PublicKey, manifest_sha256: str) -> Release:
    """The release record stored beside a bundle's manifest, checked. Raises ReleaseError."""
    try:
        raw = (bundle / RELEASE_FILE).read_bytes()
        signature = (bundle / RELEASE_SIGNATURE_FILE).read_bytes()
    except FileNotFoundError:
        raw, signature = b"", b""
    return parse_release(raw, signature, public_key, manifest_sha256, str(bundle))
