"""A site as a Flower NumPyClient that trains in its own process (the Simulation
Engine's long-lived actors, or a SuperNode with no site worker): receive the global
adapter, train or evaluate locally (`site_work.py`), reply with adapter tensors and
aggregate metrics only."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import numpy as np
from flwr.client import NumPyClient
from flwr.common import Context

from fedtune.config import RunSettings
from fedtune.errors import FedtuneError

from .dp_history import ContextHistory
from .node_settings import NodeSettings
from .optimizer_state import ContextOptimizerStore
from .secagg_setup import with_secagg_setup
from .site_work import Scalar, SiteWork

log = logging.getLogger("fedtune.site")


@contextlib.contextmanager
def errors_logged() -> Iterator[None]:
    """Log a FedtuneError as one line for the site operator, then let it fail the message."""
    try:
        yield
    except FedtuneError as err:
        log.error("fedtune: error: %s", err)
        raise


class SiteClient(NumPyClient):
    """Trains the run's LoRA adapter on one site's private examples, in this process."""

    def __init__(self, settings: RunSettings, context: Context) -> None:
        self.context = context
        node = NodeSettings.from_node_config(context.node_config, context.run_config)
        self.work = SiteWork(settings, node, ContextHistory(context), ContextOptimizerStore(context))

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        from fedtune.adapter_io import get_adapter_arrays

        return get_adapter_arrays(self.work.model(self.work.labels(config)), self.work.lora)

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        with errors_logged():
            return self.work.properties(config)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        with errors_logged():
            return self.work.fit(parameters, with_secagg_setup(config, self.context))

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        with errors_logged():
            return self.work.evaluate(parameters, config)
