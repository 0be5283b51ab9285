"""The ClientApp's side of the site worker: a Flower NumPyClient that forwards the census,
training and evaluation to the worker over its Unix socket and returns the worker's
reply. Imports no torch, transformers or peft, so a SuperNode's per-message ClientApp
process starts in about a second. A worker that is down, dies mid-request or breaks the
protocol fails the message with one line, in time for the round to go on without it."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.client import NumPyClient
from flwr.common import Context

from fedtune.errors import FedtuneError

from .secagg_setup import with_secagg_setup
from .worker_protocol import (
    PeerClosed,
    ProtocolError,
    decode_scalars,
    encode_scalars,
    hello,
    recv_frame,
    send_frame,
)

log = logging.getLogger("fedtune.site")
Scalar = bool | bytes | float | int | str
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
                raise FedtuneError(f"site worker at {path}: not running ({err.strerror}); start it with "
                                   f"`fedtune deploy site` or `fedtune site worker`") from None
            time.sleep(0.2)
        except OSError as err:
            sock.close()
            raise FedtuneError(f"site worker at {path}: cannot connect ({err.strerror or err})") from None


def call_worker(path: Path, op: str, header: Mapping[str, Any], arrays: list[np.ndarray] | None = None,
                timeout: float = 3600.0, connect_timeout: float = CONNECT_TIMEOUT,
                ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One request: hello, then `op` with its header and tensors; returns the reply."""
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
        raise FedtuneError(f"site worker at {path}: the worker stopped during '{op}' (it is restarted for the "
                           f"next round)") from None
    except socket.timeout:
        raise FedtuneError(f"site worker at {path}: no answer to '{op}' within {timeout:.0f} s") from None
    except ProtocolError as err:
        raise FedtuneError(f"site worker at {path}: {err}") from None
    except OSError as err:
        raise FedtuneError(f"site worker at {path}: {err.strerror or err}") from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise FedtuneError(str(reply.get("error", f"the worker failed '{op}'")))
    return reply, tensors


class WorkerClient(NumPyClient):
    """Forwards a site's work for one run to its site worker."""

    def __init__(self, socket_path: Path, context: Context, timeout: float) -> None:
        self.path = socket_path
        self.timeout = timeout
        self.context = context
        self.request = {"run": int(context.run_id), "run_config": encode_scalars(context.run_config),
                        "node_config": encode_scalars(context.node_config)}

    def _call(self, op: str, config: Mapping[str, Scalar], arrays: list[np.ndarray] | None = None,
              ) -> tuple[dict[str, Any], list[np.ndarray]]:
        try:
            return call_worker(self.path, op, {**self.request, "config": encode_scalars(config)}, arrays, self.timeout)
        except FedtuneError as err:
            log.error("fedtune: error: %s", err)
            raise

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        reply, _ = self._call("properties", config)
        return decode_scalars(reply["properties"])

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        reply, arrays = self._call("fit", with_secagg_setup(config, self.context), parameters)
        return arrays, int(reply["num_examples"]), decode_scalars(reply["metrics"])

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        reply, _ = self._call("evaluate", config, parameters)
        return float(reply["loss"]), int(reply["num_examples"]), decode_scalars(reply["metrics"])
