"""The site's Flower ClientApp: `flower-supernode` (deployment) or the Simulation
Engine runs it; it builds a SiteClient from the run and node config."""

from __future__ import annotations

import logging

from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS

from client.site_client import SiteClient
from fedtune.config import RunSettings
from fedtune.logs import setup_logging
from fedtune.masked_vector_codec import narrow_masked_reply
from fedtune.secure_masks import install_csprng_masks

setup_logging()


def client_fn(context: Context) -> Client:
    """Flower calls this for every message the site receives."""
    settings = RunSettings.from_run_config(context.run_config)
    return SiteClient(settings, context).to_client()


def secaggplus_when_requested(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ rounds; plain train messages pass through."""
    if msg.metadata.message_type == MessageType.TRAIN and SECAGG_CONFIGS in msg.content.config_records:
        install_csprng_masks("client")  # here, in the process that runs the mod (Ray actor or SuperNode app)
        reply = secaggplus_mod(msg, ctxt, call_next)
        narrow_masked_reply(reply)  # uint32 on the wire: half of Flower's int64
        return reply
    return call_next(msg, ctxt)


app = ClientApp(client_fn=client_fn, mods=[secaggplus_when_requested])
