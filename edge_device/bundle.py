"""A bundle on disk: `manifest.json`, its signature `manifest.sig`, and the files the
manifest lists with their sha256 and size. What is checked is exactly what gets loaded:
`verify_bundle` reads every file once into memory; `verify_bundle_into` copies every
file, hashing as it copies, into a private folder (0700) from which the runtime then loads
(onnxruntime-genai opens its model folder by path). Torch-free.

`kind` is `model` (a whole model) or `adapter` (an `.onnx_adapter` file for the base bundle
whose manifest sha256 it names in `base_bundle.manifest_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.errors import FedtuneError

from .signature import SignatureError, load_public_key, verify

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
BUNDLE_FORMAT = "fedtune-bundle/1"


class BundleError(FedtuneError):
    """A bundle that is incomplete, altered, or not signed by the trusted key."""


@dataclass(frozen=True)
class CopiedBundle:
    """A bundle whose signature and file hashes checked out, copied into `root`."""

    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    root: Path


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


def bundle_kind(manifest: dict[str, Any]) -> str:
    return str(manifest.get("kind", "model"))


def signed_manifest(bundle_dir: str | Path, trusted_key: str | Path | Ed25519PublicKey) -> tuple[dict[str, Any], str]:
    """The manifest, once its signature checks out against `trusted_key` (a key file or a
    loaded key), and its sha256."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle folder")
    key = trusted_key if isinstance(trusted_key, Ed25519PublicKey) else load_public_key(trusted_key)
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
        raise BundleError(
            f"{bundle / MANIFEST_FILE}: field 'format': expected {BUNDLE_FORMAT!r}, got {manifest.get('format')!r}"
        )
    return manifest, sha256_bytes(raw)


def verify_bundle(bundle_dir: str | Path, trusted_key: str | Path) -> VerifiedBundle:
    """Check the signature against `trusted_key`, then every listed file's size and
    sha256; return the manifest and the verified bytes. Raises BundleError."""
    manifest, _ = signed_manifest(bundle_dir, trusted_key)
    return VerifiedBundle(Path(bundle_dir), manifest, read_listed_files(Path(bundle_dir), manifest))


def copy_listed_files(bundle: Path, manifest: dict[str, Any], root: Path, chunk: int = 1 << 20) -> None:
    """Copy every listed file into `root` (0600), hashing the bytes as they are written;
    a size or sha256 that does not match the manifest removes the copy and raises."""
    for name, entry in manifest["files"].items():
        _check_name(name, bundle)
        target = root / name
        digest, size = hashlib.sha256(), 0
        try:
            with (
                open(bundle / name, "rb") as src,
                open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst,
            ):
                while block := src.read(chunk):
                    digest.update(block)
                    size += len(block)
                    dst.write(block)
        except FileNotFoundError as err:
            if err.filename == str(bundle / name):
                raise BundleError(f"{bundle / name}: listed in the manifest but missing") from None
            raise
        if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            target.unlink()
            raise BundleError(f"{bundle / name}: sha256 does not match the signed manifest (file altered)")


def verify_bundle_into(bundle_dir: str | Path, trusted_key: str | Path, root: Path) -> CopiedBundle:
    """Check the signature, then copy and hash every listed file into `root`, a folder the
    caller created private (0700). Raises BundleError; `root` may then hold partial copies."""
    manifest, digest = signed_manifest(bundle_dir, trusted_key)
    copy_listed_files(Path(bundle_dir), manifest, root)
    return CopiedBundle(Path(bundle_dir), manifest, digest, root)


def unverified_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest as it lies on disk, *not* verified: only to decide which runtime or path
    verifies the bundle next. Raises BundleError."""
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        return dict(json.loads(path.read_bytes()))
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f"{path}: missing; is {bundle_dir} a bundle?") from None
    except ValueError:
        raise BundleError(f"{path}: not JSON") from None


def find_base(manifest_sha256: str, candidates: Sequence[Path]) -> Path | None:
    """The folder among `candidates` whose manifest.json has `manifest_sha256`, if any."""
    for folder in candidates:
        manifest = folder / MANIFEST_FILE
        if manifest.is_file() and sha256_file(manifest) == manifest_sha256:
            return folder
    return None


def lora_fit_problem(shapes: dict[str, Sequence[int]], lora_inputs: dict[str, list[int]]) -> str | None:
    """Why adapter weights of these shapes cannot feed a base with these LoRA inputs
    ({name: [rows, cols]} as built; A is rows x r, B is r x cols), or None when they fit."""
    missing, extra = sorted(set(lora_inputs) - set(shapes)), sorted(set(shapes) - set(lora_inputs))
    if missing or extra:
        return (
            f"{len(missing)} of the base model's {len(lora_inputs)} LoRA inputs missing (e.g. {missing[:1]}), "
            f"{len(extra)} unexpected (e.g. {extra[:1]})"
        )
    for name, shape in shapes.items():
        rows, cols = lora_inputs[name]
        if len(shape) != 2 or (shape[0] != rows if ".lora_A." in name else shape[1] != cols):
            expected = [rows, "r"] if ".lora_A." in name else ["r", cols]
            return f"weight {name} has shape {list(shape)}; the base model expects {expected}"
    return None
