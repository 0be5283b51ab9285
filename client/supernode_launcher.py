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

App pinning and an audit line. Flower 1.41's open-source SuperNode cannot verify apps
(`--trusted-entities` needs signatures the open-source SuperLink does not make). The
launcher hands the SuperNode's loop a `get_fab` that logs the SHA-256 of every app (FAB)
a run asks this site to run, and, with `--allow-app HASH` (repeatable), uses Flower's own
verification step to refuse any other: the SuperNode replies with Flower's "FAB could not
be verified" error to every message of that run, and no ClientApp process starts, so none
of its code runs. `fedtune deploy app-hash --app DIR` prints the hash the coordinator ships.

Flower 1.41's SuperNode has no option for a TLS client certificate (`--root-certificates`
is the CA only). With `--client-cert` and `--client-key`, the launcher loads that pair
into the TLS context Flower's HTTP client (`flwr.supercore.protobuf.client.ProtobufClient`)
verifies the server with, so the SuperNode presents it to the proxy (mTLS).

    python -m fedtune.client.supernode_launcher --idle-poll 0.5 [--client-cert PEM --client-key KEY]
        [--allow-app SHA256 ...] -- <flower-supernode arguments>
"""

from __future__ import annotations

import argparse
import hashlib
import ssl
import sys
import time
from typing import Any, Sequence

PIN_ENTITY = "fedtune-app-pin"  # the trusted-entities key that routes Flower's FAB check to the pin list
PIN_VERDICT = "fedtune-app-pin"  # the FAB verification entry: "approved" or "refused"


def _changed(internal: str) -> bool:
    """Whether a Flower internal this launcher patches has changed (its one line goes to stderr)."""
    from fedtune.internals import InternalsChanged, flower

    try:
        flower.require(internal)
    except InternalsChanged as err:
        print(f"fedtune: {err}", file=sys.stderr, flush=True)
        return True
    return False


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

    if _changed("supernode-idle-poll"):
        return False
    module.time = _ShortSleepTime(limit)  # type: ignore[assignment]
    return True


def present_client_certificate(cert: str, key: str) -> bool:
    """Make every TLS connection of Flower's HTTP clients present `cert`/`key`; False if
    Flower's client is not the shape this was written for (then nothing is patched)."""
    from flwr.supercore.protobuf import client as module

    if _changed("client-certificate"):
        return False
    original = module.ProtobufClient.__init__

    def with_client_certificate(self: Any, base_url: str, *args: Any, verify: Any = True, **kwargs: Any) -> None:
        if verify is not False and base_url.startswith("https://"):
            context = (
                verify
                if isinstance(verify, ssl.SSLContext)
                else ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            )
            context.load_cert_chain(cert, key)
            verify = context
        original(self, base_url, *args, verify=verify, **kwargs)

    module.ProtobufClient.__init__ = with_client_certificate  # type: ignore[method-assign]
    return True


def app_hash(content: bytes) -> str:
    """An app's hash as the coordinator's `flwr run` and `fedtune deploy app-hash` give it."""
    return hashlib.sha256(content).hexdigest()


def pin_apps(allowed: set[str]) -> bool:
    """Log every app a run asks this SuperNode to run; with `allowed`, refuse the others
    through Flower's own FAB verification. False if Flower's SuperNode loop is not the
    shape this was written for (then nothing is patched)."""
    from flwr.supernode import start_client_internal as module

    if _changed("supernode-app-pinning"):
        return False
    pull, verify = module._pull_and_store_message, module._verify_fab

    def audited(get_fab: Any) -> Any:
        def fetch(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            digest = app_hash(fab.content)
            approved = not allowed or digest in allowed
            verdict = "approved" if approved else "REFUSED: not in --allow-app"
            print(
                f"fedtune: site: run {run_id} asks this site to run app sha256:{digest} "
                f"({verdict if allowed else 'no --allow-app list'})",
                file=sys.stderr,
                flush=True,
            )
            fab.verifications = {
                **fab.verifications,
                "valid_license": "fedtune-pinned",
                PIN_VERDICT: "approved" if approved else "refused",
            }
            return fab

        return fetch

    def pull_pinned(*args: Any, **kwargs: Any) -> Any:
        kwargs["get_fab"] = audited(kwargs["get_fab"])
        if allowed:
            kwargs["trusted_entities"] = {**(kwargs.get("trusted_entities") or {}), PIN_ENTITY: "pinned"}
        return pull(*args, **kwargs)

    def verify_pinned(fab: Any, trusted_entities: dict[str, str]) -> bool:
        if PIN_ENTITY in trusted_entities:
            return fab.verifications.get(PIN_VERDICT) == "approved"
        return bool(verify(fab, trusted_entities))

    module._pull_and_store_message = pull_pinned  # type: ignore[attr-defined]
    module._verify_fab = verify_pinned  # type: ignore[attr-defined]
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        print(
            "usage: python -m fedtune.client.supernode_launcher --idle-poll SECONDS [--client-cert PEM "
            "--client-key KEY] -- ARGS...",
            file=sys.stderr,
        )
        return 2
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="supernode_launcher")
    parser.add_argument("--idle-poll", type=float, default=3.0)
    parser.add_argument("--client-cert")
    parser.add_argument("--client-key")
    parser.add_argument("--allow-app", action="append", default=[])
    ours = parser.parse_args(args[:split])
    limit = ours.idle_poll
    if limit < 3.0 and not shorten_idle_poll(limit):
        print(
            "fedtune: this Flower's SuperNode has no 3 s idle sleep to shorten; running it as it is",
            file=sys.stderr,
            flush=True,
        )
    if ours.client_cert and not present_client_certificate(ours.client_cert, ours.client_key):
        print(
            "fedtune: this Flower's HTTP client cannot be given a client certificate; stopping",
            file=sys.stderr,
            flush=True,
        )
        return 1
    if not pin_apps({h.lower().removeprefix("sha256:") for h in ours.allow_app}):
        print(
            "fedtune: this Flower's SuperNode loop cannot be given the app check (--allow-app, audit line); stopping",
            file=sys.stderr,
            flush=True,
        )
        return 1
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[split + 1 :]]
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
