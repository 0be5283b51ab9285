"""A bundle on disk: `manifest.json`, its signature `manifest.sig`, and the files the
manifest lists with their sha256 and size. Verification reads every file once into
memory, so what is checked is exactly what gets loaded. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError

from .signature import SignatureError, load_public_key, verify

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
BUNDLE_FORMAT = "fedtune-bundle/1"


class BundleError(FedtuneError):
    """A bundle that is incomplete, altered, or not signed by the trusted key."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and file hashes checked out, with the files' bytes."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {"sha256", "bytes"}} for files in `folder`."""
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in names}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes written to manifest.json (and signed)."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _check_name(name: str, bundle: Path) -> None:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise BundleError(f"{bundle / MANIFEST_FILE}: field 'files': unsafe file name {name!r}")


def read_listed_files(bundle: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every file the manifest lists, read once and checked against its size and sha256."""
    files: dict[str, bytes] = {}
    for name, entry in manifest["files"].items():
        _check_name(name, bundle)
        try:
            data = (bundle / name).read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{bundle / name}: listed in the manifest but missing") from None
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            raise BundleError(f"{bundle / name}: sha256 does not match the signed manifest (file altered)")
        files[name] = data
    return files


def verify_bundle(bundle_dir: str | Path, trusted_key: str | Path) -> VerifiedBundle:
    """Check the signature against `trusted_key`, then every listed file's size and
    sha256; return the manifest and the verified bytes. Raises BundleError."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle folder")
    key = load_public_key(trusted_key)
    try:
        raw = (bundle / MANIFEST_FILE).read_bytes()
        signature = (bundle / SIGNATURE_FILE).read_bytes()
    except FileNotFoundError as err:
        raise BundleError(f"{err.filename}: missing; a bundle needs {MANIFEST_FILE} and {SIGNATURE_FILE}") from None
    try:
        verify(key, raw, signature, str(bundle / MANIFEST_FILE))
    except SignatureError as err:
        raise BundleError(str(err)) from None
    manifest = json.loads(raw)
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle / MANIFEST_FILE}: field 'format': expected {BUNDLE_FORMAT!r}, "
                          f"got {manifest.get('format')!r}")
    files = read_listed_files(bundle, manifest)
    return VerifiedBundle(bundle, manifest, files)
