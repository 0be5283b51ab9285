"""The registry's gRPC service: list, manifest, resumable chunked download for
devices, and a publish that only the coordinator (bearer token) may call. Served over
TLS, optionally mTLS, with bounded message sizes and a concurrency limit."""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc

from .protocol import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    InvalidName,
    StoreError,
    check_name,
)
from .store import ModelStore
from .v1 import registry_pb2 as pb
from .v1 import registry_pb2_grpc as rpc

log = logging.getLogger("fedtune.registry")
MAX_BUNDLE_BYTES = 4 << 30


@dataclass(frozen=True)
class ServerLimits:
    max_workers: int = 16
    max_concurrent_rpcs: int = 64
    max_message_bytes: int = MAX_MESSAGE_BYTES
    chunk_bytes: int = CHUNK_BYTES
    max_bundle_bytes: int = MAX_BUNDLE_BYTES


class RegistryService(rpc.ModelRegistryServicer):
    """Maps store errors to gRPC status codes; never builds a path from an unchecked name."""

    def __init__(self, store: ModelStore, publish_token: str, limits: ServerLimits) -> None:
        self.store = store
        self.token = publish_token.encode()
        self.limits = limits

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        out = []
        for name in self.store.models():
            versions = self.store.versions(name)
            out.append(pb.ModelSummary(name=name, latest_version=versions[-1].version, num_versions=len(versions)))
        return pb.ListModelsResponse(models=out)

    def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.ServicerContext) -> pb.ListVersionsResponse:
        try:
            entries = self.store.versions(request.model)
        except StoreError as err:
            _abort(context, err)
        return pb.ListVersionsResponse(
            model=request.model,
            versions=[
                pb.VersionInfo(
                    version=e.version,
                    published=e.published,
                    total_bytes=e.total_bytes,
                    manifest_sha256=e.manifest_sha256,
                    sequence=e.sequence,
                )
                for e in entries
            ],
        )

    def GetManifest(self, request: pb.GetManifestRequest, context: grpc.ServicerContext) -> pb.GetManifestResponse:
        try:
            version, manifest, signature, release, release_signature = self.store.manifest(
                request.model, request.version
            )
        except StoreError as err:
            _abort(context, err)
        return pb.GetManifestResponse(
            model=request.model,
            version=version,
            manifest=manifest,
            signature=signature,
            release=release,
            release_signature=release_signature,
        )

    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadChunk]:
        try:
            path = self.store.open_file(request.model, request.version, request.file)
            for offset, data, total in self.store.read_chunks(path, request.offset, self.limits.chunk_bytes):
                if not context.is_active():
                    return
                yield pb.DownloadChunk(offset=offset, data=data, total_bytes=total)
        except StoreError as err:
            _abort(context, err)

    def Publish(
        self, request_iterator: Iterator[pb.PublishRequest], context: grpc.ServicerContext
    ) -> pb.PublishResponse:
        self._authenticate(context)
        staging: Path | None = None
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("item") != "header":
                raise InvalidName("a publish stream starts with a header (model, version)")
            model, version = first.header.model, first.header.version
            staging = self.store.begin(model, version)
            total = 0
            for message in request_iterator:
                if message.WhichOneof("item") != "chunk":
                    raise InvalidName("only one header per publish stream")
                chunk = message.chunk
                path = staging / check_name("file", chunk.file)
                size = path.stat().st_size if path.exists() else 0
                if chunk.offset != size:
                    raise InvalidName(f"{chunk.file}: chunk at offset {chunk.offset}, expected {size}")
                total += len(chunk.data)
                if total > self.limits.max_bundle_bytes:
                    raise InvalidName(f"bundle larger than {self.limits.max_bundle_bytes} bytes")
                with open(path, "ab") as handle:
                    handle.write(chunk.data)
            entry = self.store.commit(model, version, staging)
            staging = None  # moved into place (or removed) by commit
            log.info("published %s %s (%d bytes)", model, version, entry.total_bytes)
            return pb.PublishResponse(model=model, version=version, total_bytes=entry.total_bytes)
        except StoreError as err:
            _abort(context, err)
        finally:
            if staging is not None:
                import shutil

                shutil.rmtree(staging, ignore_errors=True)

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        given = str(metadata.get("authorization", ""))
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self.token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "publishing needs the coordinator's token")


def _abort(context: grpc.ServicerContext, err: StoreError) -> None:
    context.abort(getattr(grpc.StatusCode, err.code), str(err))


def make_server(
    store: ModelStore,
    address: str,
    cert_chain: bytes,
    private_key: bytes,
    publish_token: str,
    client_ca: bytes | None = None,
    limits: ServerLimits = ServerLimits(),
) -> tuple[grpc.Server, int]:
    """A started TLS server (mTLS when `client_ca` is given); returns it and its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.max_workers),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
        ],
    )
    rpc.add_ModelRegistryServicer_to_server(RegistryService(store, publish_token, limits), server)
    credentials = grpc.ssl_server_credentials(
        [(private_key, cert_chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    port = server.add_secure_port(address, credentials)
    server.start()
    return server, port


def serve_until_signalled(server: grpc.Server, grace: float = 2.0) -> None:
    """Block until SIGTERM or SIGINT, then stop `server`, letting calls in flight finish."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=grace).wait()
