"""A strategy wrapper that stops the federation before the worst site's ε would
exceed the configured budget: each DP site reports the ε it has spent and the ε one
more round would bring; once that exceeds the budget no further round is started, and
a resume of the stopped run is refused (`resume_refusal`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from flwr.common import EvaluateIns, FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedtune.run_folder import RoundRecord

from .delegating_strategy import DelegatingStrategy

log = logging.getLogger("fedtune.server")


def resume_refusal(run_path: Path, records: Sequence[RoundRecord], dp: bool, budget: float) -> str | None:
    """Why a run may not be resumed under this budget: its last round already saw that
    one more round would pass it (the round record's `dp_epsilon_next_max`)."""
    ahead = float(records[-1].dp_epsilon_next_max or 0.0) if records else 0.0
    if dp and budget > 0 and ahead > budget:
        return (
            f"cannot resume {run_path}: the DP budget stopped it after round {records[-1].round} (one more "
            f"round would reach epsilon {ahead:.3f} > dp-epsilon-budget {budget:g})"
        )
    return None


class EpsilonBudgetStrategy(DelegatingStrategy):
    """Delegates to `inner`; refuses new rounds once the budget would be exceeded."""

    def __init__(self, inner: Strategy, budget: float, delta: float) -> None:
        super().__init__(inner)
        self.budget = budget
        self.delta = delta
        self.worst_epsilon = 0.0
        self.stopped_after: int | None = None

    def __repr__(self) -> str:
        return f"EpsilonBudgetStrategy({self.inner!r}, budget={self.budget})"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if self.stopped_after is not None:
            return []
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        aggregated = self.inner.aggregate_fit(server_round, results, failures)
        spent = [float(r.metrics["dp_epsilon"]) for _, r in results if "dp_epsilon" in r.metrics]
        ahead = [float(r.metrics["dp_epsilon_next"]) for _, r in results if "dp_epsilon_next" in r.metrics]
        if spent:
            self.worst_epsilon = max(self.worst_epsilon, *spent)
        if self.budget > 0 and ahead and max(ahead) > self.budget:
            self.stopped_after = server_round
            log.warning(
                "DP budget: stopping after round %d: worst site epsilon %.3f; one more round would reach %.3f "
                "> budget %.3f (delta %g)",
                server_round,
                self.worst_epsilon,
                max(ahead),
                self.budget,
                self.delta,
            )
        return aggregated

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.stopped_after is not None and server_round > self.stopped_after:
            return []
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if self.stopped_after is not None and server_round > self.stopped_after:
            return None
        return self.inner.evaluate(server_round, parameters)
