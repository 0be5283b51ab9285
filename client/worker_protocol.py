"""The wire between a site's ClientApp and its site worker, over a Unix socket.

Every message is one frame: the magic `FTSW`, a 4-byte header length, an 8-byte body
length (both big-endian), a UTF-8 JSON header (scalars only) and a body holding the
tensors as a safetensors blob (no pickle anywhere). Both lengths are checked against the
receiver's limits before anything is read, so an oversize message costs nothing. A
connection opens with a `hello` naming the protocol and its version; the worker answers
with its own version or refuses. Imports no torch: the ClientApp uses it too.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

Scalar = bool | bytes | float | int | str  # a record value, as Flower's flwr.common.Scalar
PROTOCOL = "fedtune-site-worker"
VERSION = 1
MAGIC = b"FTSW"
_PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 1 << 20  # 1 MiB of JSON: configs and metrics, never tensors
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB of tensors: LoRA adapters of multi-billion models fit


class ProtocolError(Exception):
    """The peer broke the protocol (bad magic, version, size or encoding)."""


class PeerClosed(ProtocolError):
    """The peer closed the connection (for the ClientApp: the worker died)."""


def encode_scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's scalars as JSON: bytes become {"$bytes": base64}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bytes):
            out[key] = {"$bytes": base64.b64encode(value).decode()}
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            raise ProtocolError(f"'{key}': {type(value).__name__} is not a Flower scalar")
    return out


def decode_scalars(values: Mapping[str, Any]) -> dict[str, Scalar]:
    out: dict[str, bool | bytes | float | int | str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and set(value) == {"$bytes"}:
            out[key] = base64.b64decode(value["$bytes"])
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            raise ProtocolError(f"'{key}': not a scalar")
    return out


def encode_arrays(arrays: list[np.ndarray]) -> bytes:
    if not arrays:
        return b""
    return st_save({f"{i:06d}": np.ascontiguousarray(a) for i, a in enumerate(arrays)})


def decode_arrays(body: bytes) -> list[np.ndarray]:
    if not body:
        return []
    try:
        tensors = st_load(body)
    except Exception as err:  # safetensors raises its own error types
        raise ProtocolError(f"the tensors are not a safetensors blob ({err})") from None
    return [tensors[k] for k in sorted(tensors)]


def send_frame(sock: socket.socket, header: Mapping[str, Any], arrays: list[np.ndarray] | None = None) -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    body = encode_arrays(arrays or [])
    sock.sendall(_PREFIX.pack(MAGIC, len(head), len(body)) + head)
    if body:
        sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise PeerClosed("the connection closed mid-message" if got or chunks else "the connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(
    sock: socket.socket, max_body: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One frame: (header, arrays). Refuses a bad magic or an oversize header/body before reading it."""
    magic, head_len, body_len = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC:
        raise ProtocolError(f"not a {PROTOCOL} message (magic {magic!r})")
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head_len} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if body_len > max_body:
        raise ProtocolError(f"message of {body_len} bytes exceeds the limit of {max_body} bytes")
    try:
        header = json.loads(_recv_exact(sock, head_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ProtocolError("the header is not a JSON object")
    return header, decode_arrays(_recv_exact(sock, body_len) if body_len else b"")


def hello() -> dict[str, Any]:
    return {"op": "hello", "protocol": PROTOCOL, "version": VERSION}


def check_hello(header: Mapping[str, Any]) -> None:
    """The worker's check of a client's first frame."""
    if header.get("op") != "hello" or header.get("protocol") != PROTOCOL:
        raise ProtocolError(f"expected a {PROTOCOL} hello")
    if header.get("version") != VERSION:
        raise ProtocolError(
            f"protocol version {header.get('version')!r} is not supported (this worker speaks {VERSION})"
        )
