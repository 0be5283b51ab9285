"""A strategy wrapper that records each round: per-site and aggregate metrics plus
traffic to `metrics.jsonl`, the global adapter as a PEFT checkpoint, and a progress
line. Aggregation itself is left entirely to the wrapped Flower strategy."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, cast

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedtune.errors import FedtuneError
from fedtune.run_folder import RoundRecord

from .delegating_strategy import DelegatingStrategy
from .polling_grid import one_line
from .surviving_sites import SurvivingSitesClientManager
from .traffic import MeteredGrid

log = logging.getLogger("fedtune.server")

SaveFn = Callable[[int, list[Any]], None]


class RecordingStrategy(DelegatingStrategy):
    """Delegates every decision to `inner`; observes and records what happened."""

    def __init__(
        self,
        inner: Strategy,
        grid: MeteredGrid,
        append_record: Callable[[RoundRecord], None],
        save_round: SaveFn,
        num_rounds: int,
        round_offset: int = 0,
        surviving_sites_floor: int = 1,
    ) -> None:
        super().__init__(inner)
        self.surviving_sites_floor = surviving_sites_floor
        self.grid = grid
        self.append_record = append_record
        self.save_round = save_round
        self.num_rounds = num_rounds
        self.round_offset = round_offset
        self.latest_parameters: Parameters | None = None
        self.completed_rounds: list[int] = []
        self._pending: RoundRecord | None = None
        self._node_site: dict[int, str] = {}
        self._round_start = time.monotonic()
        self._configured_round: int | None = None
        self._configured_sites = 0
        self._left_out: dict[int, str] = {}  # node id -> why the site refused the run (census)

    def leave_out(self, refused: dict[int, str]) -> None:
        """Sites that refused the run: no round samples them; each round's record says why."""
        self._left_out = dict(refused)

    def global_round(self, server_round: int) -> int:
        """Flower restarts at round 1 on every start; the run's round continues. Every
        call into the wrapped strategy gets the global round (round 0, the initial
        evaluation, stays 0), so FedAdam's bias correction, the fit config and the
        central evaluation schedule see the run's real round after a resume."""
        return self.round_offset + server_round if server_round > 0 else 0

    # -- observed calls (the rest are forwarded by DelegatingStrategy) ----------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        params = self.inner.initialize_parameters(client_manager)
        self.latest_parameters = params
        return params

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.flush()
        self._round_start = time.monotonic()
        if server_round > 1:  # round 1 waits for min-sites; later rounds go on with the sites left
            client_manager = self._survivors(client_manager)
        instructions = [
            (proxy, ins)
            for proxy, ins in self.inner.configure_fit(self.global_round(server_round), parameters, client_manager)
            if proxy.node_id not in self._left_out
        ]
        if instructions:  # an empty list is a deliberate stop (e.g. the DP budget), not a skip
            self._configured_round = self.global_round(server_round)
            self._configured_sites = len(instructions)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        rnd = self.global_round(server_round)
        # SecAgg+'s workflow can list one failed message twice; count sites, not entries.
        left_out = [f"node {node}: {reason}" for node, reason in sorted(self._left_out.items())]
        failed = list(dict.fromkeys(_failure_reason(f) for f in failures))
        reasons = list(dict.fromkeys([*failed, *self._refusals(rnd, set(failed)), *left_out]))
        num_failed = (max(self._configured_sites - len(results), 0) if self._configured_sites else len(reasons)) + len(
            left_out
        )
        for reason in reasons:
            log.warning("round %d: a site failed: %s", rnd, reason)
        if not results:
            raise FedtuneError(f"round {rnd}: no site returned an update ({'; '.join(reasons) or 'no sites'})")
        params, metrics = self.inner.aggregate_fit(rnd, results, failures)
        sites: dict[str, dict[str, Any]] = {}
        for proxy, res in results:
            name = str(res.metrics.get("site", f"node-{proxy.node_id}"))
            self._node_site[proxy.node_id] = name
            sites[name] = {"node_id": proxy.node_id, **{k: v for k, v in res.metrics.items() if k != "site"}}
        epsilons = [float(m["dp_epsilon"]) for m in sites.values() if "dp_epsilon" in m]
        ahead = [float(m["dp_epsilon_next"]) for m in sites.values() if "dp_epsilon_next" in m]
        self._pending = RoundRecord(
            round=rnd,
            sites=sites,
            aggregate=dict(metrics),
            failures=num_failed,
            failure_reasons=reasons,
            dp_epsilon_max=max(epsilons) if epsilons else None,
            dp_epsilon_next_max=max(ahead) if ahead else None,  # a resume checks the budget against it
        )
        if params is not None:
            self.latest_parameters = params
            self.save_round(rnd, parameters_to_ndarrays(params))
        self._log_fit(rnd, sites, num_failed)
        return params, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return [
            (proxy, ins)
            for proxy, ins in self.inner.configure_evaluate(
                self.global_round(server_round), parameters, self._survivors(client_manager)
            )
            if proxy.node_id not in self._left_out
        ]

    def _survivors(self, client_manager: ClientManager) -> ClientManager:
        return cast(ClientManager, SurvivingSitesClientManager(client_manager, self.surviving_sites_floor))

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = self.inner.aggregate_evaluate(self.global_round(server_round), results, failures)
        if self._pending is not None:
            for proxy, res in results:
                name = str(res.metrics.get("site", f"node-{proxy.node_id}"))
                entry = self._pending.sites.setdefault(name, {"node_id": proxy.node_id})
                entry.update({k: v for k, v in res.metrics.items() if k.startswith("val_")})
            self._pending.aggregate.update({k: v for k, v in metrics.items() if k.startswith("val_")})
            if loss is not None:
                self._pending.aggregate["val_loss"] = loss
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        result = self.inner.evaluate(self.global_round(server_round), parameters)
        if result is not None and self._pending is not None and server_round > 0:
            self._pending.central = {k: float(v) for k, v in result[1].items()}
        return result

    # -- recording --------------------------------------------------------------
    def flush(self) -> None:
        """Write the pending round's record (traffic included) to metrics.jsonl."""
        configured, self._configured_round = self._configured_round, None
        if self._pending is None:
            if configured is not None and configured not in self.completed_rounds:
                self._record_skipped(configured)
            return
        record = self._pending
        self._pending = None
        round_key = str(record.round - self.round_offset)
        for site in record.sites.values():
            site.update(self.grid.site_bytes(round_key, int(site["node_id"])))
        record.bytes_down = sum(s["bytes_down"] for s in record.sites.values())
        record.bytes_up = sum(s["bytes_up"] for s in record.sites.values())
        record.round_seconds = round(time.monotonic() - self._round_start, 3)
        dispatch = self.grid.dispatch_seconds(round_key)
        if dispatch["stages"]:
            record.dispatch = dispatch  # the round's stages: polling, ClientApp start-up, site work
        self.append_record(record)
        self.completed_rounds.append(record.round)
        agg = record.aggregate
        parts = [f"[round {record.round}/{self.num_rounds + self.round_offset}]"]
        if "val_accuracy" in agg:
            parts.append(f"site-val acc {agg['val_accuracy']:.4f}")
        if "val_exact_match" in agg:
            parts.append(f"site-val exact match {agg['val_exact_match']:.4f}")
        if "val_loss" in agg:
            parts.append(f"site-val loss {agg['val_loss']:.4f}")
        if record.central:
            parts.append(
                " ".join(
                    f"central {k} {v:.4f}"
                    for k, v in record.central.items()
                    if k in ("accuracy", "exact_match", "loss", "perplexity")
                )
            )
        parts.append(f"up {record.bytes_up / 1e6:.2f} MB, {record.round_seconds:.1f}s")
        log.info(" | ".join(parts))

    def _refusals(self, rnd: int, known: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """What the sites that refused this round's messages said, one line each, by site;
        reasons already in `known` (Flower passed them as fit failures) are not repeated."""
        refused = getattr(self.grid, "refusals", {}).get(str(rnd - self.round_offset), {})
        return [
            f"{self._node_site.get(node, f'node {node}')}: {reason}"
            for node, reason in sorted(refused.items())
            if reason not in known
        ]

    def _record_skipped(self, rnd: int) -> None:
        """A round that produced no aggregate (SecAgg+ below its threshold): the global
        adapter stays as it was and the run goes on."""
        refusals = [*self._refusals(rnd), *(f"node {n}: {r}" for n, r in sorted(self._left_out.items()))]
        log.warning(
            "[round %d/%d] skipped: too few sites completed secure aggregation (below the "
            "reconstruction threshold); the global adapter is unchanged%s",
            rnd,
            self.num_rounds + self.round_offset,
            "".join(f"\n  refused by {line}" for line in refusals),
        )
        self.append_record(
            RoundRecord(
                round=rnd,
                skipped=True,
                failure_reasons=refusals,
                round_seconds=round(time.monotonic() - self._round_start, 3),
            )
        )
        self.completed_rounds.append(rnd)

    def _log_fit(self, rnd: int, sites: dict[str, dict[str, Any]], failures: int) -> None:
        shown = ", ".join(
            f"{name} loss {float(m.get('train_loss', float('nan'))):.4f} (n={m.get('num_examples', '?')})"
            for name, m in sorted(sites.items())
        )
        extra = f", {failures} failed" if failures else ""
        log.info("[round %d/%d] trained: %s%s", rnd, self.num_rounds + self.round_offset, shown, extra)


def _failure_reason(failure: tuple[ClientProxy, FitRes] | BaseException | Any) -> str:
    """One readable line for a failed site: Flower wraps the site's exception (and its
    traceback) into the error reason; keep the site's own message."""
    if isinstance(failure, BaseException):
        return one_line(str(failure)) if str(failure).strip() else type(failure).__name__
    proxy, res = failure
    return f"node {proxy.node_id}: {res.status.message}"
