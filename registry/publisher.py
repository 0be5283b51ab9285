"""The coordinator's side of the registry: publish a released bundle folder (signed
manifest and files, and the signed release record that names its model and version)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import grpc

from fedtune.edge_device.bundle import MANIFEST_FILE, SIGNATURE_FILE
from fedtune.edge_device.release import RELEASE_FILE, RELEASE_SIGNATURE_FILE
from fedtune.errors import FedtuneError

from .protocol import CHUNK_BYTES, open_channel
from .v1 import registry_pb2 as pb
from .v1 import registry_pb2_grpc as rpc


def bundle_files(bundle: Path) -> list[str]:
    try:
        manifest = json.loads((bundle / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise FedtuneError(f"{bundle / MANIFEST_FILE}: missing; is {bundle} a bundle from `fedtune export`?") from None
    return [MANIFEST_FILE, SIGNATURE_FILE, RELEASE_FILE, RELEASE_SIGNATURE_FILE, *sorted(manifest["files"])]


def release_names(bundle: Path) -> tuple[str, str]:
    """The (model, version) the bundle's release record names (read, not verified here:
    the registry and the devices verify it); one line if it has none."""
    try:
        record = json.loads((bundle / RELEASE_FILE).read_bytes())
        return str(record["model"]), str(record["version"])
    except FileNotFoundError:
        raise FedtuneError(
            f"{bundle / RELEASE_FILE}: missing; release the bundle first (fedtune release {bundle} "
            f"--model NAME --version V --key KEY)"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise FedtuneError(f"{bundle / RELEASE_FILE}: not a release record") from None


def _requests(bundle: Path, model: str, version: str, names: list[str]) -> Iterator[pb.PublishRequest]:
    yield pb.PublishRequest(header=pb.PublishHeader(model=model, version=version))
    for name in names:
        with open(bundle / name, "rb") as handle:
            offset = 0
            while block := handle.read(CHUNK_BYTES):
                yield pb.PublishRequest(chunk=pb.FileChunk(file=name, offset=offset, data=block))
                offset += len(block)


def publish(
    registry: str,
    bundle_dir: str | Path,
    model: str,
    version: str,
    token: str,
    ca: bytes | None,
    cert: bytes | None = None,
    key: bytes | None = None,
    timeout: float = 600.0,
) -> pb.PublishResponse:
    bundle = Path(bundle_dir)
    released_model, released_version = release_names(bundle)
    model, version = model or released_model, version or released_version
    if (model, version) != (released_model, released_version):
        raise FedtuneError(
            f"{bundle / RELEASE_FILE}: released as {released_model} {released_version}, not "
            f"{model} {version}; the registry and devices would refuse it"
        )
    names = bundle_files(bundle)
    with open_channel(registry, ca, cert, key) as channel:
        stub = rpc.ModelRegistryStub(channel)
        try:
            return stub.Publish(
                _requests(bundle, model, version, names),
                timeout=timeout,
                metadata=(("authorization", f"Bearer {token}"),),
            )
        except grpc.RpcError as err:
            raise FedtuneError(f"{registry}: publish {model} {version}: {err.code().name}: {err.details()}") from None
