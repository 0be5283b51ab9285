"""Watching every message on the wire: in simulation, as the coordinator sends and
receives it (before it widens SecAgg+'s uint32 masked vectors), by wrapping its byte meter
with pytest's monkeypatch; in a deployment, as the SuperLink stores it."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import pytest
from flwr.common import Message

from fedtune.server import traffic


def observe_messages(monkeypatch: pytest.MonkeyPatch, observe: Callable[[str, Message], None]) -> None:
    """Call `observe("down"|"up", message)` for every message of the run."""
    measure = traffic.content_bytes

    def observed(message: Message) -> int:
        observe("up" if message.metadata.reply_to_message_id else "down", message)
        return measure(message)

    monkeypatch.setattr(traffic, "content_bytes", observed)


AUDIT_TABLE = "fedtune_wire_audit"


def record_superlink_objects(database: Path, timeout: float = 60.0) -> None:
    """Keep a copy of every object a SuperLink started with `--database FILE` receives (each
    message's content, from a site or from the ServerApp) in a table of the test's own: an
    SQLite trigger on Flower's `objects` table, which holds the bytes as they came off the
    wire and deletes them once delivered."""
    deadline = time.monotonic() + timeout
    with closing(sqlite3.connect(database, timeout=30)) as db:
        while not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='objects'").fetchone():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{database}: the SuperLink made no objects table in {timeout:.0f} s")
            time.sleep(0.5)
        db.executescript(
            f"CREATE TABLE {AUDIT_TABLE} (content BLOB);"
            f"CREATE TRIGGER {AUDIT_TABLE}_put AFTER UPDATE OF content ON objects "
            f"WHEN length(NEW.content) > 0 BEGIN INSERT INTO {AUDIT_TABLE} VALUES (NEW.content); END;"
        )


def superlink_objects(database: Path) -> list[bytes]:
    """Every object recorded since `record_superlink_objects`."""
    with closing(sqlite3.connect(database, timeout=30)) as db:
        return [bytes(row[0]) for row in db.execute(f"SELECT content FROM {AUDIT_TABLE}")]
