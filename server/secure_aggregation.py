"""SecAgg+ for adapter tensors: Flower's `SecAggPlusWorkflow`, tuned for LoRA updates.

Parameter choices (run config keys `secagg-*`):
- `clipping-range` C bounds every value sent; a site clips values beyond +-C (and
  reports how many it clipped). Adapter and head values are well below 1, so C = 4.
- `quantization-range` Q (2^22) levels over [-C, C]; `modulus-range` M (2^32) must
  exceed n * Q for n sites, or the masked sum overflows (`RunSettings.check_for_sites`).
- `max-weight` W: each site scales its tensors by r = num_examples / W before
  quantizing. W = 0 (default) uses the largest count of the census: before round 1
  every site is asked for its example count (a plain message; the counts travel unmasked
  in any case). The census also finds the sites that refuse the run (their privacy
  floor, an app they do not run): those are left out of every round with their reason,
  since Flower's SecAgg+ cannot recover from a site that drops before the key exchange.
- `reconstruction-threshold` (fraction of shares) and `num-shares` (fraction of sites).
- `timeout`: how long a stage waits past its last reply (`polling_grid.py`): it must exceed
  one site's cold start plus local training; a dead site is dropped sooner.

Error bound. With stochastic rounding each site's quantisation error is below one
step 2C/Q per value, so for the aggregate of n surviving sites, per value,

    |secure mean - weighted mean| <= 2 n C / (Q * sum_k r_k) + 2 max|x| / (Q * min_k r_k)

where the second term comes from rounding the weights r_k to multiples of 1/Q. With W
the largest site's count, sum_k r_k >= 1: for n = 3, C = 4, Q = 2^22 the first term is
at most 5.7e-6.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flwr.common import GetPropertiesIns, Message
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat as compat
from flwr.server.workflow import SecAggPlusWorkflow

from fedtune.config import RunSettings
from fedtune.errors import FedtuneError

from .polling_grid import one_line
from .secagg_active import SignedSecAggPlusWorkflow
from .secagg_dropouts import DropoutTolerantSecAggPlusWorkflow, check_workflow_state

log = logging.getLogger("fedtune.server")


def secagg_error_bound(settings: RunSettings, num_sites: int, ratios: list[float], max_abs: float = 1.0) -> float:
    """The documented per-value bound on |secure mean - plain weighted mean|."""
    q = settings.secagg_quantization_range
    c = settings.secagg_clipping_range
    return 2 * num_sites * c / (q * sum(ratios)) + 2 * max_abs / (q * min(ratios))


def wait_for_sites(grid: Any, min_sites: int, timeout: float) -> list[int]:
    """Node ids once at least `min_sites` sites are connected."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= min_sites:
            return nodes
        if time.monotonic() > deadline:
            raise FedtuneError(f"only {len(nodes)} of the required {min_sites} sites connected within {timeout:.0f}s")
        time.sleep(1.0)


@dataclass(frozen=True)
class Census:
    """What the sites said before round 1: the largest example count, and who refused."""

    max_weight: float
    refused: dict[int, str]  # node id -> the site's one-line reason
    counts: tuple[int, ...] = ()  # each answering site's training-example count


def secagg_census(grid: Any, nodes: list[int], timeout: float) -> Census:
    """Ask every site for its training-example count; a site that refuses says why."""
    content = compat.getpropertiesins_to_recorddict(GetPropertiesIns({"fedtune": "num_examples"}))
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageTypeLegacy.GET_PROPERTIES, group_id="census")
        for node in nodes
    ]
    counts: list[int] = []
    refused: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            refused[reply.metadata.src_node_id] = one_line(reply.error.reason)
            log.warning(
                "SecAgg+ census: node %d refused the run: %s",
                reply.metadata.src_node_id,
                refused[reply.metadata.src_node_id],
            )
        elif reply.has_content():
            res = compat.recorddict_to_getpropertiesres(reply.content)
            if "num_examples" in res.properties:
                counts.append(int(res.properties["num_examples"]))
    if not counts:
        raise FedtuneError(
            "no site answered the SecAgg+ census of example counts"
            + (f" ({'; '.join(refused.values())})" if refused else "")
        )
    log.info("SecAgg+: %d sites, largest holds %d training examples (max_weight)", len(counts), max(counts))
    return Census(float(max(counts)), refused, tuple(counts))


def build_secagg_workflow(settings: RunSettings, max_weight: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow (recovering from sites that drop before the key
    exchange: `secagg_dropouts.py`) with fedtune's adapter-tuned parameters."""
    check_workflow_state()
    workflow = SignedSecAggPlusWorkflow if settings.secagg_active else DropoutTolerantSecAggPlusWorkflow
    return workflow(
        num_shares=float(settings.secagg_num_shares),
        reconstruction_threshold=float(settings.secagg_reconstruction_threshold),
        max_weight=max_weight,
        clipping_range=settings.secagg_clipping_range,
        quantization_range=settings.secagg_quantization_range,
        modulus_range=settings.secagg_modulus_range,
        timeout=settings.secagg_timeout,
    )
