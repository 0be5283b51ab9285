"""Heterogeneous LoRA ranks with `hetero-aggregation = padding` (`fedtune/site_rank.py`): a
strategy wrapper that turns the sites' example-weighted mean (their factors, zero where
they did not train, and, last, the column-weight vectors saying which components each
trained) into the column-weighted aggregate, then hands it to the run's strategy as one
result.

Under SecAgg+ the workflow passes the unmasked mean of all sites as one result, so the
coordinator never sees a site's B or its rank; without SecAgg+ the wrapper takes the mean
itself. Either way each column of B is the mean over the sites that trained it: with A
frozen and shared, the aggregate's B A is exactly that column-weighted mean of the sites'
products (FFA-LoRA, Sun et al., ICLR 2024; heterogeneous ranks as in HetLoRA, Cho et al.,
2024, but exact and masked). With A trained, each row of A is likewise the mean over its
trainers: HetLoRA's zero-padding, whose product of means is not the mean of products.
Server-side optimizers (FedAvgM, FedAdam, ...) then step from that aggregate as they would
from FedAvg's."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flwr.common import Code, FitIns, FitRes, Parameters, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.strategy.aggregate import aggregate

from fedtune.site_rank import column_weighted

from .delegating_strategy import DelegatingStrategy
from .strategies import weighted_metrics


class RankColumnsStrategy(DelegatingStrategy):
    """Column-weighted aggregation of B (and rows of A) for sites of different LoRA ranks."""

    def __init__(
        self,
        inner: Strategy,
        b_indices: Sequence[int],
        initial: Sequence[np.ndarray],
        a_indices: Sequence[int] = (),
    ) -> None:
        super().__init__(inner)
        self.b_indices = list(b_indices)
        self.a_indices = list(a_indices)
        self.current = [np.asarray(a) for a in initial]  # the global adapter the round started from

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.current = parameters_to_ndarrays(parameters)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return self.inner.aggregate_fit(server_round, results, failures)
        arrays = [(parameters_to_ndarrays(res.parameters), res.num_examples) for _, res in results]
        if len(arrays[0][0]) != len(self.current) + 1:
            raise ValueError(
                f"hetero-ranks: a result holds {len(arrays[0][0])} tensors, expected the adapter's "
                f"{len(self.current)} and the column weights"
            )
        one = FitRes(
            Status(Code.OK, ""),
            ndarrays_to_parameters([a.astype(np.float32) for a in self.combine(arrays)]),
            sum(n for _, n in arrays),
            weighted_metrics([(res.num_examples, res.metrics) for _, res in results]),
        )
        return self.inner.aggregate_fit(server_round, [(results[0][0], one)], failures)

    def combine(self, results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
        """The round's aggregate adapter from the results (each: the adapter's arrays, then
        the column weights; under SecAgg+ one result, the unmasked mean)."""
        return column_weighted(aggregate(results), self.b_indices, self.current, self.a_indices)  # Flower's mean
