"""Runs Flower's `flower-supernode` with a shorter idle poll.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever it pulls no message from the
SuperLink (`flwr/supernode/start_client_internal.py`: `time.sleep(3)`), and 0.5 s while
it waits for a reply; it has no option for either. Every stage of a round (SecAgg+ has
four, evaluation one) starts with that sleep, so it sets a floor of up to 3 s per stage.
This launcher gives that module a `time` whose `sleep` waits at most `--idle-poll`
seconds, then calls Flower's own entry point with the remaining arguments. It patches
nothing if Flower's module no longer looks as described (checked below), and
`--idle-poll 3` is Flower's own behaviour. The price: an idle SuperNode asks the
SuperLink for work every `--idle-poll` seconds instead of every 3.

    python -m fedtune.client.supernode_launcher --idle-poll 0.5 -- <flower-supernode arguments>
"""

from __future__ import annotations

import inspect
import sys
import time
from typing import Any, Sequence

FLOWER_IDLE_SLEEP = "time.sleep(3)"


class _ShortSleepTime:
    """The `time` module, except that `sleep` waits at most `limit` seconds."""

    def __init__(self, limit: float) -> None:
        self._limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._limit))


def shorten_idle_poll(limit: float) -> bool:
    """Patch the SuperNode's polling sleeps to at most `limit` s; False if Flower's code
    is not the shape this was written for (then nothing is patched)."""
    from flwr.supernode import start_client_internal as module

    if FLOWER_IDLE_SLEEP not in inspect.getsource(module) or getattr(module, "time", None) is not time:
        return False
    module.time = _ShortSleepTime(limit)  # type: ignore[assignment]
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "--idle-poll" or args[2] != "--":
        print("usage: python -m fedtune.client.supernode_launcher --idle-poll SECONDS -- ARGS...", file=sys.stderr)
        return 2
    limit = float(args[1])
    if limit < 3.0 and not shorten_idle_poll(limit):
        print("fedtune: this Flower's SuperNode has no 3 s idle sleep to shorten; running it as it is",
              file=sys.stderr, flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[3:]]
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
