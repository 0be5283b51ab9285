"""Releasing a signed bundle: a copy of it (files hard-linked where the file system
allows) with a signed release record naming the model, the version and a sequence
number (`edge_device/release.py`). The registry and the devices refuse a bundle
without one, served under another name or version, or older than what a device runs.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from fedtune.edge_device.bundle import MANIFEST_FILE, SIGNATURE_FILE, BundleError, signed_manifest
from fedtune.edge_device.release import (
    CANDIDATE_SUFFIX,
    CHANNELS,
    RELEASE_FILE,
    RELEASE_SIGNATURE_FILE,
    Release,
    candidate_model,
    check_release_names,
)
from fedtune.edge_device.signature import SignatureError
from fedtune.errors import FedtuneError

from .signing import load_private_key, sign


def default_sequence() -> int:
    """The current UTC time in milliseconds: grows from one release to the next without
    any state, as long as the releasing machine's clock does."""
    return int(time.time() * 1000)


def release_bundle(
    bundle: str | Path,
    model: str,
    version: str,
    key_path: str | Path,
    out: str | Path,
    sequence: int | None = None,
    channel: str = "release",
    gate: str = "",
) -> Release:
    """Check `bundle` against `key_path`'s public half, copy it to `out` (which must not
    exist) and add the signed release record. Returns the record. A `channel` of
    "candidate" releases it to the sites' gate only, under MODEL.candidate."""
    source, target = Path(bundle), Path(out)
    if channel not in CHANNELS:
        raise FedtuneError(f"channel must be one of {CHANNELS}, got {channel!r}")
    if channel == "candidate" and not model.endswith(CANDIDATE_SUFFIX):
        model = candidate_model(model)
    check_release_names(model, version)
    number = default_sequence() if sequence is None else sequence
    if number < 1:
        raise FedtuneError(f"--sequence must be a positive integer, got {number}")
    key = load_private_key(key_path)
    public = key.public_key()  # the bundle must be signed by this very key
    try:
        manifest, digest = signed_manifest(source, public)
    except (BundleError, SignatureError) as err:
        raise FedtuneError(f"{source}: cannot release: {err}") from None
    if target.exists():
        raise FedtuneError(f"{target}: already exists; a release is never overwritten")
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name in [MANIFEST_FILE, SIGNATURE_FILE, *sorted(manifest["files"])]:
            try:
                os.link(source / name, staging / name)
            except OSError:
                shutil.copy2(source / name, staging / name)
        record = Release(model, version, number, digest, channel, gate)
        raw = record.to_bytes()
        (staging / RELEASE_FILE).write_bytes(raw)
        (staging / RELEASE_SIGNATURE_FILE).write_bytes(sign(key, raw))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record
