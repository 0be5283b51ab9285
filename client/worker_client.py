"""The ClientApp's side of the site worker: one request over its Unix socket (hello, then
the request and its tensors), and `relay_to_worker`, the ClientApp mod that hands every
Flower message to the worker and returns the reply content the worker built. Imports no
torch, transformers or peft, so a SuperNode's per-message ClientApp process starts in
about a second. A worker that is down, dies mid-request or breaks the protocol fails the
message with one line, in time for the round to go on without it."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto, recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module

from fedtune.errors import FedtuneError

from .node_settings import NodeSettings
from .worker_protocol import (
    PeerClosed,
    ProtocolError,
    encode_scalars,
    hello,
    recv_frame,
    send_frame,
)

log = logging.getLogger("fedtune.site")
CONNECT_TIMEOUT = 60.0  # seconds to wait for a (re)starting worker's socket


def connect(path: Path, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """Connect to the worker, waiting up to `timeout` s for it to (re)start."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if time.monotonic() >= deadline:
                raise FedtuneError(
                    f"site worker at {path}: not running ({err.strerror}); start it with "
                    f"`fedtune deploy site` or `fedtune deploy worker`"
                ) from None
            time.sleep(0.2)
        except OSError as err:
            sock.close()
            raise FedtuneError(f"site worker at {path}: cannot connect ({err.strerror or err})") from None


def call_worker(
    path: Path,
    op: str,
    header: Mapping[str, Any],
    arrays: list[np.ndarray] | None = None,
    timeout: float = 3600.0,
    connect_timeout: float = CONNECT_TIMEOUT,
    what: str = "",
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One request: hello, then `op` with its header and tensors; returns the reply. `what`
    names the request in errors (default: `op`)."""
    what = what or op
    sock = connect(path, connect_timeout)
    try:
        sock.settimeout(timeout)
        try:
            send_frame(sock, hello())
        except (BrokenPipeError, ConnectionResetError):
            pass  # a worker that refuses this peer answers and closes at once: read why
        greeting, _ = recv_frame(sock)
        if not greeting.get("ok"):
            raise FedtuneError(f"site worker at {path}: {greeting.get('error', 'refused the handshake')}")
        send_frame(sock, {"op": op, **header}, arrays)
        reply, tensors = recv_frame(sock)
    except (PeerClosed, ConnectionResetError, BrokenPipeError):
        raise FedtuneError(
            f"site worker at {path}: the worker stopped during '{what}' (it is restarted for the next round)"
        ) from None
    except socket.timeout:
        raise FedtuneError(f"site worker at {path}: no answer to '{what}' within {timeout:.0f} s") from None
    except ProtocolError as err:
        raise FedtuneError(f"site worker at {path}: {err}") from None
    except OSError as err:
        raise FedtuneError(f"site worker at {path}: {err.strerror or err}") from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise FedtuneError(str(reply.get("error", f"the worker failed '{what}'")))
    return reply, tensors


def worker_socket(context: Context) -> Path | None:
    """The site worker this ClientApp relays to, if any."""
    path = NodeSettings.from_node_config(context.node_config, context.run_config).worker_socket
    return Path(path) if path else None


def relay_to_worker(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """With a site worker, the whole message goes to it and its reply comes back as built
    there (SecAgg+, training, evaluation, the census); without one, the next mod runs."""
    path = worker_socket(ctxt)
    if path is None:
        return call_next(msg, ctxt)
    secagg = ctxt.run_config.get("secagg", True) is True
    timeout = float(ctxt.run_config.get("secagg-timeout", 600.0)) if secagg else 3600.0  # type: ignore[arg-type]
    header = {
        "run": int(ctxt.run_id),
        "run_config": encode_scalars(ctxt.run_config),
        "node_config": encode_scalars(ctxt.node_config),
    }
    body = np.frombuffer(message_to_proto(msg).SerializeToString(), dtype=np.uint8)
    try:
        _, arrays = call_worker(path, "message", header, [body], timeout, what=str(msg.metadata.message_type))
        if len(arrays) != 1:
            raise FedtuneError(f"site worker at {path}: a reply is one tensor, got {len(arrays)}")
        content = recorddict_from_proto(ProtoRecordDict.FromString(arrays[0].tobytes()))
    except FedtuneError as err:
        # One line in the site's log, and the reason in the reply the coordinator gets (no traceback).
        log.error("fedtune: error: %s", err)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)), reply_to=msg)
    return Message(content, reply_to=msg)
