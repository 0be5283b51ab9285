"""The site worker: a long-lived process per site that loads the base model once onto
the site's device and trains and evaluates on request from the site's ClientApp
processes, over a private Unix socket (`worker_protocol.py`).

Private: the socket lives in a 0700 directory owned by the worker's user, is itself
0600, and every connection's peer uid (`SO_PEERCRED`) must be the worker's own. Per run
(Flower's run id, and the node config: in a simulation one worker may serve every
virtual site, sharing its one model) it keeps the run's settings, the site's data and tokenised examples,
the last adapter it trained and the site's DP accountant (also on disk); a run's state
goes after its last round, or after `idle_timeout` without a request. The model stays.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedtune.errors import FedtuneError

from .worker_protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL,
    VERSION,
    ProtocolError,
    check_hello,
    decode_scalars,
    encode_scalars,
    recv_frame,
    send_frame,
)

log = logging.getLogger("fedtune.site")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, NUL included
FINISHED_GRACE = 60.0  # seconds a finished run's state stays for a late evaluate


@dataclass
class RunState:
    """What the worker keeps for one run."""

    work: Any  # site_work.SiteWork (imported with torch, on the first request)
    last_used: float = field(default_factory=time.monotonic)
    finished: bool = False
    adapter: list[np.ndarray] | None = None
    rounds: set[int] = field(default_factory=set)


def prepare_socket_dir(path: Path) -> None:
    """The socket's directory: created 0700 if missing; refused if another user owns it."""
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise FedtuneError(f"{path}: a Unix socket path must be at most {MAX_SOCKET_PATH} bytes; choose a shorter "
                           f"--worker-socket")
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise FedtuneError(f"{folder}: owned by uid {info.st_uid}, not this user ({os.getuid()}); the worker's "
                           f"socket needs a private directory")
    if stat.S_IMODE(info.st_mode) & 0o077:
        folder.chmod(0o700)


def peer_uid(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


class SiteWorker:
    """Serves one site's training and evaluation requests with a model kept loaded."""

    def __init__(self, socket_path: Path, idle_timeout: float = 1800.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, threads: int = 0) -> None:
        self.path = socket_path
        self.idle_timeout = idle_timeout
        self.max_message_bytes = max_message_bytes
        self.threads = threads
        self.runs: dict[tuple[int, str], RunState] = {}
        self.work_lock = threading.Lock()  # one model: requests train and evaluate one at a time
        self.stop = threading.Event()
        self.refused = 0
        self.requests = 0
        self.started = time.time()

    # ------------------------------------------------------------------ serving
    def listen(self) -> socket.socket:
        prepare_socket_dir(self.path)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
                raise FedtuneError(f"{self.path}: another site worker already listens here")
            except (ConnectionRefusedError, FileNotFoundError):
                self.path.unlink(missing_ok=True)  # a stale socket from a worker that died
            finally:
                probe.close()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old)
        self.path.chmod(0o600)
        server.listen(16)
        server.settimeout(1.0)
        return server

    def serve(self) -> None:
        """Accept connections until SIGTERM/SIGINT (or `stop`), then remove the socket."""
        server = self.listen()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        log.info("site worker: listening on %s (pid %d, %s v%d)", self.path, os.getpid(), PROTOCOL, VERSION)
        try:
            while not self.stop.is_set():
                self.drop_stale_runs()
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
        finally:
            server.close()
            self.path.unlink(missing_ok=True)
            log.info("site worker: stopped")

    def handle(self, conn: socket.socket) -> None:
        with conn:
            pid, uid = peer_uid(conn)
            if uid != os.getuid():
                self.refused += 1
                log.warning("site worker: refused a connection from uid %d (pid %d): not this worker's user", uid, pid)
                self._reply(conn, {"ok": False, "error": f"uid {uid} may not use this site worker"})
                return
            try:
                conn.settimeout(30.0)
                header, _ = recv_frame(conn, max_body=0)
                check_hello(header)
                self._reply(conn, {"ok": True, "protocol": PROTOCOL, "version": VERSION, "pid": os.getpid()})
                request, arrays = recv_frame(conn, self.max_message_bytes)
            except ProtocolError as err:
                self.refused += 1
                log.warning("site worker: refused pid %d: %s", pid, err)
                self._reply(conn, {"ok": False, "error": str(err)})
                return
            except OSError:
                return  # the client went away
            conn.settimeout(None)
            self.requests += 1
            self._reply(conn, *self.dispatch(request, arrays))

    @staticmethod
    def _reply(conn: socket.socket, header: dict[str, Any], arrays: list[np.ndarray] | None = None) -> None:
        try:
            send_frame(conn, header, arrays)
        except OSError:
            pass  # the ClientApp gave up waiting; nothing to tell it

    # ------------------------------------------------------------------ requests
    def dispatch(self, request: dict[str, Any], arrays: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        op = request.get("op")
        if op == "status":
            return self.status(), []
        handlers: dict[str, Callable[[RunState, dict[str, Any], list[np.ndarray]], tuple[dict[str, Any], list[np.ndarray]]]] = {
            "properties": self._properties, "fit": self._fit, "evaluate": self._evaluate}
        if op not in handlers:
            return {"ok": False, "error": f"unknown request {op!r}"}, []
        try:
            config = decode_scalars(request.get("config", {}))
            with self.work_lock:
                run = self.run_state(request)
                started = time.monotonic()
                header, out = handlers[op](run, config, arrays)
                run.last_used = time.monotonic()
            server_round = int(config.get("server-round", 0))
            if server_round and server_round >= int(config.get("num-rounds", 0) or 10**9):
                run.finished = True
            log.info("site worker: run %s %s (round %s) in %.1f s", request.get("run"), op, server_round or "-",
                     time.monotonic() - started)
            return {"ok": True, **header, "seconds": time.monotonic() - started}, out
        except FedtuneError as err:
            log.error("fedtune: error: %s", err)
            return {"ok": False, "error": str(err)}, []
        except Exception as err:  # the worker stays up; the message fails with the reason
            log.exception("site worker: %s failed", op)
            return {"ok": False, "error": f"site worker: {op} failed: {type(err).__name__}: {err}"}, []

    def run_state(self, request: dict[str, Any]) -> RunState:
        node_config = decode_scalars(request.get("node_config", {}))
        run_id = (int(request["run"]), json.dumps(encode_scalars(node_config), sort_keys=True))
        state = self.runs.get(run_id)
        if state is None:
            from fedtune.config import RunSettings

            from .dp_history import MemoryHistory
            from .site_work import SiteWork

            if self.threads:
                import torch

                torch.set_num_threads(self.threads)
            settings = RunSettings.from_run_config(decode_scalars(request.get("run_config", {})))
            state = RunState(SiteWork(settings, node_config, MemoryHistory()))
            self.runs[run_id] = state
            log.info("site worker: run %d: state created (%s, %s)", run_id[0], settings.base_model, settings.task)
        return state

    def _properties(self, run: RunState, config: dict[str, Any], _: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"properties": encode_scalars(run.work.properties(config))}, []

    def _fit(self, run: RunState, config: dict[str, Any], arrays: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        out, num_examples, metrics = run.work.fit(arrays, config)
        run.adapter = out
        run.rounds.add(int(config.get("server-round", 0)))
        return {"num_examples": num_examples, "metrics": encode_scalars(metrics)}, out

    def _evaluate(self, run: RunState, config: dict[str, Any], arrays: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        loss, num_examples, metrics = run.work.evaluate(arrays, config)
        return {"loss": loss, "num_examples": num_examples, "metrics": encode_scalars(metrics)}, []

    def drop_stale_runs(self) -> None:
        now = time.monotonic()
        for run_id, state in list(self.runs.items()):
            idle = now - state.last_used
            if (state.finished and idle > FINISHED_GRACE) or idle > self.idle_timeout:
                if not self.work_lock.acquire(blocking=False):
                    return  # busy training: sweep later, never block the accept loop
                try:
                    self.runs.pop(run_id, None)
                finally:
                    self.work_lock.release()
                log.info("site worker: run %d: state dropped (%s)", run_id[0], "finished" if state.finished else "idle")

    def status(self) -> dict[str, Any]:
        cache = sys.modules.get(f"{__package__}.model_cache")  # imported with the first run, never here
        loads = cache.model_loads() if cache is not None else 0
        return {"ok": True, "pid": os.getpid(), "protocol": PROTOCOL, "version": VERSION, "model_loads": loads,
                "runs": [{"run": k[0], "node_config": json.loads(k[1]), "rounds": sorted(v.rounds), "finished": v.finished}
                         for k, v in self.runs.items()],
                "requests": self.requests, "refused": self.refused, "uptime": time.time() - self.started}
