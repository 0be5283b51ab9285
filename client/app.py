"""The site's Flower ClientApp: `flower-supernode` (deployment) or the Simulation
Engine runs it; it builds a SiteClient from the run and node config."""

from __future__ import annotations

import logging

from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.common import Context

from client.site_client import SiteClient
from fedtune.config import RunSettings
from fedtune.logs import setup_logging

setup_logging()


def client_fn(context: Context) -> Client:
    """Flower calls this for every message the site receives."""
    settings = RunSettings.from_run_config(context.run_config)
    return SiteClient(settings, dict(context.node_config)).to_client()


app = ClientApp(client_fn=client_fn)
