"""Test hooks for a site, injected as Flower mods around the product's ClientApp.

The product's app never reads an environment variable that would make a site write its
raw update or fail on purpose; a test builds its own ClientApp with these mods and hands
it to the simulation launcher:

- `AuditUpdates(folder)`, inside SecAgg+'s mod: writes each site's unmasked reply
  (adapter arrays, example count) and its whole adapter (A included) to a local folder,
  so a test can compare what SecAgg+ delivered with what the sites sent.
- `FailAt({"site-2@1"})`, inside SecAgg+'s mod: that site raises in that round's training.
- `FailStage({"site-2@1:setup"})`, outside it: that site raises on that round's SecAgg+ stage.
- `SlowFit(seconds)`, inside SecAgg+'s mod: every site's training takes `seconds` longer.
- `CannedUpdate()`, inside SecAgg+'s mod: a fit returns a fixed update made from the node id
  (`hostile_secagg.canned_update`) instead of training: tests of the protocol itself.
- `CountMaskDraws(log)`, outside SecAgg+'s mod: appends "client <pid>" to `log` every
  time that process draws a CSPRNG mask.

Ray runs the sites in worker processes; the mods travel there by reference, so
`importable_in_workers()` puts this folder on the workers' PYTHONPATH first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message, MessageType, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import (
    recorddict_to_fitins,
    recorddict_to_fitres,
)

from fedtune.client.node_settings import NodeSettings

TESTS_DIR = Path(__file__).resolve().parent.parent
Mod = Callable[[Message, Context, ClientAppCallable], Message]


def importable_in_workers() -> None:
    """Let Ray's worker processes (started after this call) import `support.*`."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(TESTS_DIR) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *paths])


def client_app_with(inner: Sequence[Mod] = (), outer: Sequence[Mod] = ()) -> ClientApp:
    """The product's ClientApp with test mods outside and inside its own mods."""
    from fedtune.client import app as site_app

    importable_in_workers()
    return ClientApp(client_fn=site_app.client_fn, mods=[*outer, *site_app.MODS, *inner])


def _is_fit(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and msg.has_content() and bool(msg.content.array_records)


def _site_name(ctxt: Context) -> str:
    return NodeSettings.from_node_config(ctxt.node_config).name


@dataclass(frozen=True)
class FailAt:
    """Raise in the training of the listed "SITE@ROUND" pairs."""

    targets: frozenset[str]

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if _is_fit(msg):
            server_round = int(recorddict_to_fitins(msg.content, keep_input=True).config["server-round"])
            site = _site_name(ctxt)
            if f"{site}@{server_round}" in self.targets:
                raise RuntimeError(f"test hook: {site} fails in round {server_round}")
        return call_next(msg, ctxt)


@dataclass(frozen=True)
class FailStage:
    """Outside SecAgg+'s mod: raise on the listed "SITE@ROUND:STAGE" SecAgg+ stage messages
    (e.g. a site that drops during setup, before the key exchange)."""

    targets: frozenset[str]

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        configs = msg.content.config_records.get("secaggplus_configs") if msg.has_content() else None
        if msg.metadata.message_type == MessageType.TRAIN and configs is not None:
            target = f"{_site_name(ctxt)}@{msg.metadata.group_id}:{configs.get('stage')}"
            if target in self.targets:
                raise RuntimeError(f"test hook: {target} fails")
        return call_next(msg, ctxt)


@dataclass(frozen=True)
class SlowFit:
    """Every site's training takes `seconds` longer (a large model's round, in small)."""

    seconds: float

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if _is_fit(msg):
            import time

            time.sleep(self.seconds)
        return call_next(msg, ctxt)


@dataclass(frozen=True)
class AuditUpdates:
    """Write each site's unmasked fit reply, and its whole adapter, to `folder`."""

    folder: str

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        if not _is_fit(msg) or reply.has_error():
            return reply
        from fedtune.adapter_io import get_adapter_arrays
        from fedtune.client.model_cache import held_model

        fitins = recorddict_to_fitins(msg.content, keep_input=True)
        fitres = recorddict_to_fitres(reply.content, keep_input=True)
        model = held_model()  # the one the site just trained
        assert model is not None
        arrays = parameters_to_ndarrays(fitres.parameters)
        site, server_round = fitres.metrics["site"], int(fitins.config["server-round"])
        path = Path(self.folder)
        path.mkdir(parents=True, exist_ok=True)
        np.savez(
            path / f"{site}-round{server_round:03d}.npz",
            num_examples=fitres.num_examples,
            **{f"a{i:04d}": a for i, a in enumerate(arrays)},
            **{f"full{i:04d}": a for i, a in enumerate(get_adapter_arrays(model))},
        )
        return reply


@dataclass(frozen=True)
class CountMaskDraws:
    """Append "client <pid>" to `log` each time this process draws CSPRNG masks."""

    log: str

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        from fedtune.secagg import masks

        draw = masks.csprng_rand_gen
        if not getattr(draw, "counted", False):
            log = self.log

            def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
                with open(log, "a", encoding="utf-8") as handle:
                    handle.write(f"client {os.getpid()}\n")
                return draw(*args, **kwargs)

            counted.counted = True  # type: ignore[attr-defined]
            masks.csprng_rand_gen = counted
        return call_next(msg, ctxt)


@dataclass(frozen=True)
class CannedUpdate:
    """Every fit returns `canned_update(node id)` instead of training."""

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if _is_fit(msg):
            from support.hostile_secagg import canned_fit_reply

            return canned_fit_reply(msg, msg.metadata.dst_node_id)
        return call_next(msg, ctxt)
