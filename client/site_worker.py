"""The site worker: a long-lived process per site that loads the base model once onto
the site's device and answers the site's Flower messages, relayed by its ClientApp
processes over a private Unix socket (`worker_protocol.py`, `worker_messages.py`).

It owns the site's policy (`site_policy.py`: data file, state folder, name, privacy
floor, SecAgg+ minimum), read once from its own command line; nothing in a message
changes it. SecAgg+ runs here, so the unmasked adapter never leaves this process, and
replies are built here. Private: the socket lives in a directory owned by the worker's
user (0700, or 0750 with the ClientApp account's group), and every connection's peer uid
(`SO_PEERCRED`) must be the worker's own or one the site allowed (its SuperNode's
account). Started without a policy (`--simulation`), one worker serves every virtual
site of a simulation, taking each site's node config from the message: that mode
protects nothing from the ClientApp and is for one operator's simulations only.
Per run it keeps the run's settings, the site's data and tokenised examples, its SecAgg+
protocol state and DP accountant (also on disk); a run's state goes after its last round,
or after `idle_timeout` without a request. The model stays.
"""

from __future__ import annotations

import hashlib
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
from typing import Any

import numpy as np

from fedtune.errors import FedtuneError

from .site_policy import SitePolicy
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
MAX_RUN_STATES = 16  # runs (or settings asked for one run) kept at once: a message cannot make more
FINISHED_GRACE = 60.0  # seconds a finished run's state stays for a late evaluate


@dataclass
class RunState:
    """What the worker keeps for one run."""

    work: Any  # site_work.SiteWork (imported with torch, on the first request)
    messages: Any  # worker_messages.RunMessages
    last_used: float = field(default_factory=time.monotonic)
    finished: bool = False
    rounds: set[int] = field(default_factory=set)


def prepare_socket_dir(path: Path, group: int | None = None) -> None:
    """The socket's directory: created 0700 if missing (0750 with `group`, the ClientApp
    account's, as its group); refused if another user owns it."""
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise FedtuneError(
            f"{path}: a Unix socket path must be at most {MAX_SOCKET_PATH} bytes; choose a shorter --worker-socket"
        )
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise FedtuneError(
            f"{folder}: owned by uid {info.st_uid}, not this user ({os.getuid()}); the worker's "
            f"socket needs a private directory"
        )
    if group is not None:
        os.chown(folder, -1, group)
        folder.chmod(0o750)
    elif stat.S_IMODE(info.st_mode) & 0o077:
        folder.chmod(0o700)


def peer_uid(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


class SiteWorker:
    """Serves one site's training and evaluation requests with a model kept loaded."""

    def __init__(
        self,
        socket_path: Path,
        policy: SitePolicy | None,
        idle_timeout: float = 1800.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        threads: int = 0,
        socket_group: int | None = None,
        devices: int = 1,
    ) -> None:
        self.path = socket_path
        self.devices = devices
        self.ranks: Any = None  # the site's RankGroup when it trains on several devices (`site_ranks.py`)
        self.policy = policy
        self.peers = policy.peer_set() if policy else None  # signed SecAgg+: checked before any run
        self.socket_group = socket_group
        self.allowed_uids = {os.getuid(), *(policy.allowed_uids if policy else ())}
        self.idle_timeout = idle_timeout
        self.max_message_bytes = max_message_bytes
        self.threads = threads
        self.runs: dict[tuple[int, str, str], RunState] = {}
        self.work_lock = threading.Lock()  # one model: requests train and evaluate one at a time
        self.stop = threading.Event()
        self.refused = 0
        self.requests = 0
        self.started = time.time()

    # ------------------------------------------------------------------ serving
    def listen(self) -> socket.socket:
        prepare_socket_dir(self.path, self.socket_group)
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
        if self.socket_group is not None:
            os.chown(self.path, -1, self.socket_group)
            self.path.chmod(0o660)
        else:
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
        if self.policy is None:
            log.warning(
                "site worker: simulation mode: node settings come from each message; this protects "
                "nothing from the ClientApp (a deployed site starts the worker with --data)"
            )
        else:
            p = self.policy
            log.info(
                "site worker: site %s, data %s, state %s, floor %s, SecAgg+ with at least %d sites%s, peers uid %s",
                p.name,
                p.data_path,
                p.state_dir,
                p.floor.to_node_config() or "none",
                p.min_secagg_sites,
                f", signed, with {len(self.peers.peers)} known sites" if self.peers else "",
                sorted(self.allowed_uids),
            )
        try:
            if self.devices > 1:
                from .site_ranks import RankGroup

                self.ranks = RankGroup(self.devices, self.path.parent / "ranks.rendezvous", self.threads).start()
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
            if self.ranks is not None:
                self.ranks.stop()
            log.info("site worker: stopped")

    def handle(self, conn: socket.socket) -> None:
        with conn:
            pid, uid = peer_uid(conn)
            if uid not in self.allowed_uids:
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
            if request.get("op") == "status" and uid != os.getuid():
                # The worker's runs name the site's paths and floor: for the site's own account only.
                self._reply(conn, {"ok": False, "error": f"uid {uid} may not ask this site worker for its status"})
                return
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
        if op != "message":
            return {"ok": False, "error": f"unknown request {str(op)[:40]!r}"}, []
        try:
            from .worker_messages import decode_message, encode_content

            msg = decode_message(arrays)
            with self.work_lock:
                run = self.run_state(request, msg.metadata.run_id)
                started = time.monotonic()
                content = run.messages.handle(msg)
                run.last_used = time.monotonic()
            log.info(
                "site worker: run %d %s in %.1f s",
                msg.metadata.run_id,
                msg.metadata.message_type,
                time.monotonic() - started,
            )
            return {"ok": True, "seconds": time.monotonic() - started}, encode_content(content)
        except (FedtuneError, ProtocolError) as err:
            log.error("fedtune: error: %s", err)
            return {"ok": False, "error": str(err)}, []
        except Exception as err:  # the worker stays up; the message fails with the reason
            log.exception("site worker: %s failed", op)
            return {"ok": False, "error": f"site worker: {op} failed: {type(err).__name__}: {err}"}, []

    def run_state(self, request: dict[str, Any], run: int) -> RunState:
        """The run's state; in a deployed site its node settings are the site's policy, never the message's."""
        from .node_settings import NodeSettings

        if self.policy is not None:
            node = self.policy.node_settings()
        else:
            raw = request.get("node_config")
            node = NodeSettings.from_node_config(decode_scalars(raw if isinstance(raw, dict) else {}))
        raw_config = request.get("run_config")
        if not isinstance(raw_config, dict):
            raise ProtocolError("a request names its run's settings as 'run_config', an object")
        run_config = decode_scalars(raw_config)
        # Keyed by the settings too: whatever a message asks is judged as asked, never merged into another's state.
        asked = hashlib.sha256(json.dumps(encode_scalars(run_config), sort_keys=True).encode()).hexdigest()[:16]
        run_id = (int(run), json.dumps(encode_scalars(node.to_node_config()), sort_keys=True), asked)
        state = self.runs.get(run_id)
        if state is None:
            if len(self.runs) >= MAX_RUN_STATES:
                raise ProtocolError(
                    f"this worker already keeps {MAX_RUN_STATES} runs' state; a new one is refused until one finishes"
                )
            from fedtune.config import RunSettings

            from .dp_history import MemoryHistory
            from .site_policy import DEFAULT_MIN_SECAGG_SITES
            from .site_work import SiteWork
            from .worker_messages import RunMessages

            if self.threads:
                import torch

                torch.set_num_threads(self.threads)
            settings = RunSettings.from_run_config(run_config)
            if self.policy is not None:
                settings = self.policy.run_settings(settings)
            work = SiteWork(settings, node, MemoryHistory(), ranks=self.ranks)
            min_sites = self.policy.min_secagg_sites if self.policy else DEFAULT_MIN_SECAGG_SITES
            state = RunState(work, None)
            state.messages = RunMessages(
                work, int(run), min_sites, peers=self.peers, on_fit=lambda r, n, s=state: self._fitted(s, r, n)
            )
            self.runs[run_id] = state
            log.info("site worker: run %d: state created (%s, %s)", run_id[0], settings.base_model, settings.task)
        return state

    @staticmethod
    def _fitted(state: RunState, server_round: int, num_rounds: int) -> None:
        """A round trained; the run is finished after its last round (the message's count:
        a train-epochs plan sets it at the coordinator; else the run config's)."""
        state.rounds.add(server_round)
        if server_round and server_round >= (num_rounds or state.work.settings.num_rounds):
            state.finished = True

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
        return {
            "ok": True,
            "pid": os.getpid(),
            "protocol": PROTOCOL,
            "version": VERSION,
            "model_loads": loads,
            "runs": [
                {"run": k[0], "node_config": json.loads(k[1]), "rounds": sorted(v.rounds), "finished": v.finished}
                for k, v in self.runs.items()
            ],
            "requests": self.requests,
            "refused": self.refused,
            "uptime": time.time() - self.started,
        }
