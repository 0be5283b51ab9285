"""A TLS (optionally mTLS) gRPC channel to the registry with the same message limits
as the server."""

from __future__ import annotations

import grpc

from fedtune.registry.service import MAX_MESSAGE_BYTES


def open_channel(registry: str, ca: bytes | None, cert: bytes | None = None, key: bytes | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(registry, credentials, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
