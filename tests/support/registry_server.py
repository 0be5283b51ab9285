"""A registry server on 127.0.0.1 (real gRPC, TLS) and a throwaway PKI, for tests."""

from __future__ import annotations

from pathlib import Path

from fedtune.edge_export.release import release_bundle
from fedtune.registry.protocol import open_channel
from fedtune.registry.publisher import publish
from fedtune.registry.service import ServerLimits, make_server
from fedtune.registry.store import ModelStore
from fedtune.registry.v1 import registry_pb2_grpc as rpc
from fedtune.tls import create_ca, issue

TOKEN = "coordinator-secret-token"


class Registry:
    """A running registry server and what a client needs to reach it."""

    def __init__(self, root: Path, pki: dict[str, bytes], keys: dict[str, Path], mtls: bool = False) -> None:
        self.store_dir = root / "store"
        self.pki = pki
        self.keys = keys
        self.server, port = make_server(
            ModelStore(self.store_dir, trusted_key=keys["public"]),
            "127.0.0.1:0",
            pki["server_cert"],
            pki["server_key"],
            TOKEN,
            client_ca=pki["ca"] if mtls else None,
            limits=ServerLimits(max_workers=24),
        )
        self.address = f"127.0.0.1:{port}"

    def publish(
        self,
        bundle: Path,
        model: str,
        version: str,
        sequence: int,
        key: Path | None = None,
        channel: str = "release",
        gate: str = "",
    ) -> Path:
        """Release `bundle` as `model` `version` with `sequence` (signed with `key`, default
        the coordinator's; a candidate goes under MODEL.candidate) and publish it with the
        token; returns the released folder."""
        released = self.store_dir.parent / "releases" / channel / model / f"{version}-{sequence}"
        record = release_bundle(bundle, model, version, key or self.keys["private"], released, sequence, channel, gate)
        publish(self.address, released, record.model, version, TOKEN, self.pki["ca"])
        return released

    def stub(self, **tls: bytes) -> rpc.ModelRegistryStub:
        return rpc.ModelRegistryStub(open_channel(self.address, self.pki["ca"], **tls))


def make_pki(root: Path) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1/localhost and a device client certificate."""
    create_ca(root)
    server_cert, server_key = issue(root, "server", ["127.0.0.1", "localhost"])
    device_cert, device_key = issue(root, "device-1", client=True)
    return {
        "ca": (root / "ca.pem").read_bytes(),
        "server_cert": server_cert.read_bytes(),
        "server_key": server_key.read_bytes(),
        "device_cert": device_cert.read_bytes(),
        "device_key": device_key.read_bytes(),
    }
