"""The registry's wire contract, shared by its server and the devices that pull from it:
message and chunk limits, which names are allowed, the error a bad name raises, and a
TLS (optionally mTLS) gRPC channel with the same limits as the server. The messages
themselves are the generated stubs in `v1/`."""

from __future__ import annotations

import re

import grpc

CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 4 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(Exception):
    """Base for registry errors; `code` names the gRPC status the service maps it to."""

    code = "INTERNAL"


class InvalidName(StoreError):
    code = "INVALID_ARGUMENT"


def check_name(kind: str, name: str) -> str:
    """A model, version or file name: letters, digits, '.', '_', '-'; no separators, no '..'."""
    if not NAME_RE.match(name or "") or ".." in name:
        raise InvalidName(f"{kind} name {name!r} is not allowed (letters, digits, '.', '_', '-'; no '/' or '..')")
    return name


def open_channel(registry: str, ca: bytes | None, cert: bytes | None = None, key: bytes | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(
        registry,
        credentials,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
