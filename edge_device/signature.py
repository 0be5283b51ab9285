"""Checking a bundle's Ed25519 signature on the device (`cryptography`).

The public key is a PEM SubjectPublicKeyInfo file; the signature is the raw 64-byte
Ed25519 signature of the exact bytes of `manifest.json`. Signing lives with the export
(`edge_export/signing.py`); a device only ever holds the public key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.errors import FedtuneError


class SignatureError(FedtuneError):
    """A signature that does not verify, or a key file that cannot be used."""


def read_key_file(path: str | Path, what: str) -> bytes:
    """A key file's bytes, or one line naming the file."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{path}: {what} file not found") from None
    except OSError as err:
        raise SignatureError(f"{path}: cannot read {what}: {err.strerror}") from None


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM, SubjectPublicKeyInfo)."""
    data = read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise SignatureError(f"{path}: not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex: how manifests and logs name a key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def verify(key: Ed25519PublicKey, data: bytes, signature: bytes, what: str) -> None:
    """Raise SignatureError unless `signature` is `key`'s signature of `data`."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise SignatureError(
            f"{what}: signature does not verify against the trusted key {fingerprint(key)[:16]}"
        ) from None
