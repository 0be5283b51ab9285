"""Flower's own (legacy-API) strategies by name. The legacy API is what SecAgg+'s
workflow drives, so every strategy here works with and without secure aggregation."""

from __future__ import annotations

from typing import Callable

from flwr.common import Metrics, NDArrays, Parameters, Scalar
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from fedtune.config import RunSettings

from .distributed_dp import distributed_dp_strategy

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]
ConfigFn = Callable[[int], dict[str, Scalar]]


def weighted_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted mean of every numeric metric the sites reported."""
    total = sum(n for n, _ in results)
    if total == 0:
        return {}
    keys = {
        k
        for _, m in results
        for k, v in m.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("num_examples", "steps")
    }
    return {
        k: sum(n * float(m[k]) for n, m in results if k in m) / max(sum(n for n, m in results if k in m), 1)
        for k in sorted(keys)
    }


def build_strategy(
    settings: RunSettings,
    initial_parameters: Parameters,
    evaluate_fn: EvaluateFn | None,
    fit_config_fn: ConfigFn,
    evaluate_config_fn: ConfigFn,
) -> Strategy:
    """FedAvg, FedAvgM, FedProx, FedAdam or FedYogi over the adapter tensors; with
    `dp-mode = "distributed"`, server Adam on the sites' noisy gradients instead.

    Every one starts from the example-weighted mean of the sites' tensors. FedAvgM then
    steps `server-learning-rate` times that mean update (plus `server-momentum`); with K
    equal sites a rate of K makes a round move as far as central training over the same
    examples would, where plain FedAvg moves 1/K as far.
    """
    common = dict(
        fraction_fit=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_fit_clients=settings.min_sites,
        min_evaluate_clients=settings.min_sites if settings.fraction_evaluate > 0 else 0,
        min_available_clients=settings.min_sites,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=fit_config_fn,
        on_evaluate_config_fn=evaluate_config_fn,
        accept_failures=True,
        initial_parameters=initial_parameters,
        fit_metrics_aggregation_fn=weighted_metrics,
        evaluate_metrics_aggregation_fn=weighted_metrics,
    )
    if settings.dp and settings.dp_mode == "distributed":
        return distributed_dp_strategy(settings, **common)
    name = settings.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedavgm":
        return FedAvgM(
            server_learning_rate=settings.server_learning_rate, server_momentum=settings.server_momentum, **common
        )
    if name == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    if name == "fedadam":
        return FedAdam(eta=settings.fedopt_eta, eta_l=settings.learning_rate, tau=settings.fedopt_tau, **common)
    return FedYogi(eta=settings.fedopt_eta, eta_l=settings.learning_rate, tau=settings.fedopt_tau, **common)
