"""The site's Flower ClientApp: `flower-supernode` (deployment) or the Simulation
Engine runs it; it builds a SiteClient from the run and node config."""

from __future__ import annotations

import logging

from flwr.client import Client
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS as SECAGG_CONFIGS,
)

from fedtune.config import RunSettings
from fedtune.logs import setup_logging
from fedtune.secagg.masks import SecAggSetupError, install_csprng_masks
from fedtune.secagg.wire_codec import narrow_masked_reply

from .site_client import SiteClient

log = logging.getLogger("fedtune.site")
setup_logging()


def client_fn(context: Context) -> Client:
    """Flower calls this for every message the site receives."""
    settings = RunSettings.from_run_config(context.run_config)
    return SiteClient(settings, context).to_client()


def secaggplus_when_requested(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ rounds; plain train messages pass through.

    Before any SecAgg+ stage, in the process that runs the mod (a Ray actor or a
    SuperNode's ClientApp process), the CSPRNG masks are installed and checked; if
    Flower would not call them, the site refuses SecAgg+ and replies with the error."""
    if msg.metadata.message_type == MessageType.TRAIN and SECAGG_CONFIGS in msg.content.config_records:
        try:
            install_csprng_masks("client")
        except SecAggSetupError as err:
            log.error("fedtune: error: %s", err)
            raise
        reply = secaggplus_mod(msg, ctxt, call_next)
        narrow_masked_reply(reply)  # uint32 on the wire: half of Flower's int64
        return reply
    return call_next(msg, ctxt)


# The mods every site runs, outermost first; tests build their own ClientApp with extra mods around these.
MODS = [secaggplus_when_requested]
app = ClientApp(client_fn=client_fn, mods=list(MODS))
