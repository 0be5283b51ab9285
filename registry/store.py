"""The registry's store on disk: `STORE/<model>/<version>/` holds one published bundle
(its files, `manifest.json`, `manifest.sig`, and its signed release record
`release.json`, `release.sig`) and `STORE/<model>/versions.json` the publication order.
A bundle is accepted only if the trusted key signed it and its release record names
this model and version and a sequence above every earlier version's. Names are checked
before any path is built from them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fedtune.edge_device.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    sha256_bytes,
    verify_bundle,
)
from fedtune.edge_device.release import (
    CANDIDATE_SUFFIX,
    RELEASE_FILE,
    RELEASE_SIGNATURE_FILE,
    ReleaseError,
    check_release_fits,
    read_release,
)
from fedtune.edge_device.signature import load_public_key

from .protocol import InvalidName, StoreError, check_name

INDEX_FILE = "versions.json"


class NotFound(StoreError):
    code = "NOT_FOUND"


class Conflict(StoreError):
    code = "ALREADY_EXISTS"


class Rejected(StoreError):
    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class VersionEntry:
    version: str
    published: str
    total_bytes: int
    manifest_sha256: str
    sequence: int = 0


class ModelStore:
    """Read and publish bundles; publishing is atomic (temp folder, verify, rename)."""

    def __init__(self, root: str | Path, trusted_key: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.trusted_key = trusted_key
        self._lock = threading.Lock()

    # ---- reading -------------------------------------------------------------------
    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / INDEX_FILE).exists())

    def versions(self, model: str) -> list[VersionEntry]:
        index = self.root / check_name("model", model) / INDEX_FILE
        if not index.exists():
            raise NotFound(f"model {model!r} is not in the registry")
        return [VersionEntry(**entry) for entry in json.loads(index.read_text())]

    def resolve(self, model: str, version: str) -> Path:
        """The folder of `version` (empty: the latest)."""
        entries = self.versions(model)
        if not version:
            version = entries[-1].version
        check_name("version", version)
        if version not in {e.version for e in entries}:
            raise NotFound(f"model {model!r} has no version {version!r}")
        return self.root / model / version

    def manifest(self, model: str, version: str) -> tuple[str, bytes, bytes, bytes, bytes]:
        """(version, manifest, its signature, release record, its signature); the record
        is empty for a version stored before releases existed."""
        folder = self.resolve(model, version)
        release = folder / RELEASE_FILE
        return (
            folder.name,
            (folder / MANIFEST_FILE).read_bytes(),
            (folder / SIGNATURE_FILE).read_bytes(),
            release.read_bytes() if release.exists() else b"",
            (folder / RELEASE_SIGNATURE_FILE).read_bytes() if release.exists() else b"",
        )

    def open_file(self, model: str, version: str, name: str) -> Path:
        folder = self.resolve(model, version)
        check_name("file", name)
        path = folder / name
        if not path.is_file():
            raise NotFound(f"model {model!r} version {folder.name!r} has no file {name!r}")
        return path

    def read_chunks(self, path: Path, offset: int, chunk_size: int) -> Iterator[tuple[int, bytes, int]]:
        size = path.stat().st_size
        if offset > size:
            raise InvalidName(f"offset {offset} is past the end of {path.name} ({size} bytes)")
        with open(path, "rb") as handle:
            handle.seek(offset)
            while block := handle.read(chunk_size):
                yield offset, block, size
                offset += len(block)

    # ---- publishing ----------------------------------------------------------------
    def begin(self, model: str, version: str) -> Path:
        """A private staging folder for an incoming bundle."""
        check_name("model", model)
        check_name("version", version)
        if (self.root / model / version).exists():
            raise Conflict(f"model {model!r} already has version {version!r}; versions are immutable")
        (self.root / model).mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".incoming-{version}-", dir=self.root / model))

    def commit(self, model: str, version: str, staging: Path) -> VersionEntry:
        """Verify the staged bundle (the trusted key's signature, every sha256, a release
        record for this model and version) and move it into place; the staging folder is
        removed on failure."""
        try:
            verify_bundle(staging, self.trusted_key)
            raw = (staging / MANIFEST_FILE).read_bytes()
            release = read_release(staging, load_public_key(self.trusted_key), sha256_bytes(raw))
            # a candidate is stored only under MODEL.candidate, a release never there
            candidate = model.endswith(CANDIDATE_SUFFIX)
            if (release.channel == "candidate") != candidate:
                raise ReleaseError(
                    f"bundle: a {release.channel} cannot be published as {model!r} "
                    f"(candidates go under MODEL{CANDIDATE_SUFFIX}, releases under MODEL)"
                )
            check_release_fits(release, model, version, "bundle", candidate)
            entry = VersionEntry(
                version,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                sum(p.stat().st_size for p in staging.iterdir()),
                sha256_bytes(raw),
                release.sequence,
            )
            with self._lock:
                target = self.root / model / version
                if target.exists():
                    raise Conflict(f"model {model!r} already has version {version!r}; versions are immutable")
                index = self.root / model / INDEX_FILE
                earlier = [VersionEntry(**e) for e in json.loads(index.read_text())] if index.exists() else []
                if earlier and release.sequence <= max(e.sequence for e in earlier):
                    newest = max(earlier, key=lambda e: e.sequence)
                    raise Rejected(
                        f"bundle refused: release sequence {release.sequence} is not above "
                        f"{newest.sequence} ({model} {newest.version}); sequences only grow"
                    )
                os.replace(staging, target)
                index = self.root / model / INDEX_FILE
                entries = json.loads(index.read_text()) if index.exists() else []
                entries.append(entry.__dict__)
                tmp = index.with_suffix(".tmp")
                tmp.write_text(json.dumps(entries, indent=2))
                os.replace(tmp, index)
            return entry
        except (BundleError, ReleaseError) as err:
            raise Rejected(f"bundle refused: {err}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
