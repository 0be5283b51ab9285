"""Runs Flower's `flower-supernode` with a shorter idle poll and, where the coordinator's
proxy requires one, a client certificate.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever it pulls no message from the
SuperLink (`flwr/supernode/start_client_internal.py`: `time.sleep(3)`), and 0.5 s while
it waits for a reply; it has no option for either. Every stage of a round (SecAgg+ has
four, evaluation one) starts with that sleep, so it sets a floor of up to 3 s per stage.
This launcher gives that module a `time` whose `sleep` waits at most `--idle-poll`
seconds, then calls Flower's own entry point with the remaining arguments. It patches
nothing if Flower's module no longer looks as described (checked below), and
`--idle-poll 3` is Flower's own behaviour. The price: an idle SuperNode asks the
SuperLink for work every `--idle-poll` seconds instead of every 3.

Flower 1.41's SuperNode has no option for a TLS client certificate (`--root-certificates`
is the CA only). With `--client-cert` and `--client-key`, the launcher loads that pair
into the TLS context Flower's HTTP client (`flwr.supercore.protobuf.client.ProtobufClient`)
verifies the server with, so the SuperNode presents it to the proxy (mTLS).

    python -m fedtune.client.supernode_launcher --idle-poll 0.5 [--client-cert PEM --client-key KEY] -- <flower-supernode arguments>
"""

from __future__ import annotations

import argparse
import inspect
import ssl
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


def present_client_certificate(cert: str, key: str) -> bool:
    """Make every TLS connection of Flower's HTTP clients present `cert`/`key`; False if
    Flower's client is not the shape this was written for (then nothing is patched)."""
    from flwr.supercore.protobuf import client as module

    original = module.ProtobufClient.__init__
    if "verify" not in inspect.signature(original).parameters:
        return False

    def with_client_certificate(self: Any, base_url: str, *args: Any, verify: Any = True, **kwargs: Any) -> None:
        if verify is not False and base_url.startswith("https://"):
            context = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context(
                cafile=verify if isinstance(verify, str) else None)
            context.load_cert_chain(cert, key)
            verify = context
        original(self, base_url, *args, verify=verify, **kwargs)

    module.ProtobufClient.__init__ = with_client_certificate  # type: ignore[method-assign]
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        print("usage: python -m fedtune.client.supernode_launcher --idle-poll SECONDS [--client-cert PEM "
              "--client-key KEY] -- ARGS...", file=sys.stderr)
        return 2
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="supernode_launcher")
    parser.add_argument("--idle-poll", type=float, default=3.0)
    parser.add_argument("--client-cert")
    parser.add_argument("--client-key")
    ours = parser.parse_args(args[:split])
    limit = ours.idle_poll
    if limit < 3.0 and not shorten_idle_poll(limit):
        print("fedtune: this Flower's SuperNode has no 3 s idle sleep to shorten; running it as it is",
              file=sys.stderr, flush=True)
    if ours.client_cert and not present_client_certificate(ours.client_cert, ours.client_key):
        print("fedtune: this Flower's HTTP client cannot be given a client certificate; stopping",
              file=sys.stderr, flush=True)
        return 1
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[split + 1:]]
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
