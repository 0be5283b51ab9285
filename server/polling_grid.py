"""A Flower Grid wrapper that waits for replies with a short poll and times each stage.

Flower 1.41's gRPC/HTTP grid sleeps 3 s between pulls in `send_and_receive`; this one
pushes the messages and pulls every `poll_interval` seconds (the in-memory grid of the
Simulation Engine uses 0.1 s too). For every stage (a push and its replies) it keeps when
the messages left and when each reply came back; a deployed site's reply carries when
its ClientApp process started and when its handler ran (`fedtune.stage_timing`), so the
stage's wall time splits into
  polling      = (process start - push) + (reply received - handler end): the SuperNode's
                 idle sleep, SuperExec's poll, the SuperNode's reply loop and ours;
  clientapp    = handler start - process start: the ClientApp process's own start-up;
  site work    = handler end - handler start,
taken from the reply that arrived last (the one the stage waited for).

A stage's deadline follows the work, not the clock: `timeout` is how long the stage
waits after its last sign of progress (the push, then each reply), so sites that run one
after another (the Simulation Engine's virtual sites) each get the whole `timeout`, and a
deployed site that is still working is waited for up to `timeout` past its peers. A site
that died does not hold the stage for that long: the SuperLink answers a message to a node
whose heartbeats lapsed (Flower's default: 2 x 30 s) with a "node unavailable" error, and
a site whose ClientApp or worker died answers with an error at once; either ends its wait.

It also keeps, per stage group, the one-line reason of every error reply (a site that
refused: its privacy floor, its SecAgg+ minimum, an app it does not run), so the round's
record and the log can name the site and what it said.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from flwr.common import Message

from fedtune.stage_timing import TIMING_RECORD


@dataclass(frozen=True)
class StageTiming:
    kind: str
    seconds: float
    polling: float | None
    clientapp_start: float | None
    site_work: float | None


class FastPollingGrid:
    """Delegates to a Flower Grid; `send_and_receive` polls every `poll_interval` s."""

    def __init__(self, grid: Any, poll_interval: float = 0.1) -> None:
        self._grid = grid
        self.poll_interval = poll_interval
        self.stages: dict[str, list[StageTiming]] = defaultdict(list)
        self.refusals: dict[str, dict[int, str]] = defaultdict(dict)  # group -> node id -> reason

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        group = messages[0].metadata.group_id if messages else ""
        pushed = time.time()
        waiting = set(self._grid.push_messages(messages))
        del messages
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        last: tuple[Message, float] | None = None
        while waiting and (timeout is None or time.monotonic() < end):
            got = list(self._grid.pull_messages(waiting))
            now = time.time()
            if got and timeout is not None:
                end = time.monotonic() + timeout  # progress: the clock starts again for the rest
            for reply in got:
                waiting.discard(reply.metadata.reply_to_message_id)
                last = (reply, now)
                if reply.has_error():
                    self.refusals[group].setdefault(reply.metadata.src_node_id, one_line(reply.error.reason))
            replies.extend(got)
            if waiting:
                time.sleep(self.poll_interval)
        if last is not None:
            self.stages[group].append(stage_timing(kind, pushed, *last))
        return replies

    def dispatch_seconds(self, round_key: str) -> dict[str, Any]:
        """A round's stages summed: wall time, polling, ClientApp start-up and site work."""
        stages = self.stages.get(round_key, [])
        out: dict[str, Any] = {"stages": len(stages), "stage_seconds": round(sum(s.seconds for s in stages), 3)}
        timed = [s for s in stages if s.polling is not None]
        if timed and len(timed) == len(stages):
            out["polling_seconds"] = round(sum(s.polling or 0.0 for s in timed), 3)
            out["clientapp_start_seconds"] = round(sum(s.clientapp_start or 0.0 for s in timed), 3)
            out["site_work_seconds"] = round(sum(s.site_work or 0.0 for s in timed), 3)
        return out


def one_line(reason: str, limit: int = 300) -> str:
    """A site's error reason as one line: Flower wraps an exception's traceback around the
    site's own message; keep that message (its last line), bounded."""
    text = str(reason)
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    lines = [re.sub(r"""[\\'">)]+$""", "", ln).strip() for ln in text.replace("\\n", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    return (lines[-1] if lines else "no reason given")[:limit]


def stage_timing(kind: str, pushed: float, reply: Message, received: float) -> StageTiming:
    seconds = received - pushed
    record = reply.content.metric_records.get(TIMING_RECORD) if reply.has_content() else None
    if record is None:
        return StageTiming(kind, seconds, None, None, None)
    start, begin, end = (float(record[k]) for k in ("process_start", "handler_start", "handler_end"))  # type: ignore[arg-type]
    return StageTiming(
        kind,
        seconds,
        polling=max(0.0, start - pushed) + max(0.0, received - end),
        clientapp_start=max(0.0, begin - start),
        site_work=end - begin,
    )
