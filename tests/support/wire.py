"""Watching every message the coordinator sends and receives, as it is on the wire
(before the coordinator widens SecAgg+'s uint32 masked vectors), by wrapping the
coordinator's byte meter with pytest's monkeypatch."""

from __future__ import annotations

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
