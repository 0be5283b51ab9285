"""After round 1, a round samples the sites still connected, not `min-sites` of them.

`min-sites` is what a federation needs to start. Flower's client manager blocks a round's
sampling (for up to a day) until `min_fit_clients` sites are connected, so once one site
dies for good every later round, and the round's federated evaluation, would wait for it.
This wrapper lets a round after the first go on with the sites that are left, as long as
they are at least `floor` (2 under SecAgg+, whose sites also enforce their own minimum;
1 otherwise); below that it waits as Flower does. A site that comes back is sampled again."""

from __future__ import annotations

import logging
from typing import Any

from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

log = logging.getLogger("fedtune.server")


class SurvivingSitesClientManager:
    """A Flower ClientManager whose `sample` asks for at most the connected sites."""

    def __init__(self, inner: ClientManager, floor: int) -> None:
        self._inner = inner
        self.floor = floor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def num_available(self) -> int:
        return self._inner.num_available()

    def sample(
        self, num_clients: int, min_num_clients: int | None = None, criterion: Criterion | None = None
    ) -> list[ClientProxy]:
        available = self._inner.num_available()
        wanted = num_clients if min_num_clients is None else min_num_clients
        if self.floor <= available < wanted:
            log.warning(
                "%d of the %d sites the run started with are connected: this round goes on with them", available, wanted
            )
            return self._inner.sample(min(num_clients, available), available, criterion)
        return self._inner.sample(num_clients, min_num_clients, criterion)
