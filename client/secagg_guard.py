"""The site's own checks on each SecAgg+ stage message, run in the site worker before
Flower's `secaggplus_mod` sees it: a setup below the site's minimum (the fewest sites
whose sum the coordinator may unmask, a usable clipping and modular range) is refused,
and so is an unmask request that asks for both shares of one participant or for shares
of nodes this site never exchanged keys with. Flower's mod checks the stage order, the
types, and that enough neighbours are listed; these are what it leaves to the site.

What it cannot catch alone (a coordinator that registers sybil sites, or tells different
sites different stories about who dropped) needs signed keys and a consistency round
across sites; docs/security.md says so."""

from __future__ import annotations

import math
from typing import Any

from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Key, Stage

from fedtune.errors import FedtuneError

MAX_MODULUS = 1 << 32  # masked vectors travel as uint32 (fedtune.secagg.wire_codec)


class SecAggRefused(FedtuneError):
    """A SecAgg+ stage this site will not run."""


def check_stage_request(configs: ConfigRecord, state: ConfigRecord | None, min_sites: int, site: str) -> None:
    """Refuse a stage message below this site's minimum, before Flower's mod runs it."""
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        _check_setup(configs, min_sites, site)
    elif stage == Stage.UNMASK:
        _check_unmask(configs, state, site)


def config_int(configs: ConfigRecord, key: str) -> int:
    """An integer SecAgg+ parameter from a stage message (a bool is refused too)."""
    value = configs.get(key)
    if type(value) is not int:  # noqa: E721 (bool is an int)
        raise SecAggRefused(f"SecAgg+ setup: '{key}' must be an integer")
    return value


def _check_setup(configs: ConfigRecord, min_sites: int, site: str) -> None:
    sample, shares, threshold = (config_int(configs, k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
    target, modulus = config_int(configs, Key.TARGET_RANGE), config_int(configs, Key.MOD_RANGE)
    clip = configs.get(Key.CLIPPING_RANGE)
    if threshold < min_sites:
        raise SecAggRefused(
            f"site {site} refuses SecAgg+ with a reconstruction threshold of {threshold}: it takes "
            f"part only where at least {min_sites} sites' updates are summed (--min-secagg-sites)"
        )
    if not threshold <= shares <= sample:
        raise SecAggRefused(
            f"site {site} refuses SecAgg+ with threshold {threshold}, {shares} shares and "
            f"{sample} sites: needs threshold <= shares <= sites"
        )
    if not (isinstance(clip, float) and math.isfinite(clip) and clip > 0):
        raise SecAggRefused(f"site {site} refuses SecAgg+ with clipping range {clip!r}: needs a finite value > 0")
    if not 2 <= target < modulus <= MAX_MODULUS:
        raise SecAggRefused(
            f"site {site} refuses SecAgg+ with quantization range {target} and modulus {modulus}: "
            f"needs 2 <= quantization range < modulus <= 2^32"
        )


def _check_unmask(configs: ConfigRecord, state: ConfigRecord | None, site: str) -> None:
    active = configs.get(Key.ACTIVE_NODE_ID_LIST)
    dead = configs.get(Key.DEAD_NODE_ID_LIST)
    if not isinstance(active, list) or not isinstance(dead, list):
        raise SecAggRefused("SecAgg+ unmask: the lists of active and dropped sites are missing")
    if len(set(active)) != len(active) or len(set(dead)) != len(dead) or set(active) & set(dead):
        # Both shares of one node (its self-mask seed and its key) reveal its update in the clear.
        raise SecAggRefused(
            f"site {site} refuses to unmask: the coordinator lists a site as both active and dropped, or twice"
        )
    known = set(_neighbours(state))
    unknown = sorted((set(active) | set(dead)) - known)
    if unknown:
        raise SecAggRefused(
            f"site {site} refuses to unmask: the coordinator asks for shares of sites this site "
            f"never exchanged keys with (nodes {unknown[:4]}; known {sorted(known)[:8]})"
        )


def _neighbours(state: ConfigRecord | None) -> list[Any]:
    """Node ids this site exchanged keys with in the current protocol run (Flower's state)."""
    if state is None:
        return []
    keys = state.get("public_keys_dict:K")
    return list(keys) if isinstance(keys, list) else []


def protocol_state(context_state: Any) -> ConfigRecord | None:
    """Flower's SecAgg+ state record in a context's state, if any."""
    return context_state.config_records.get(RECORD_KEY_STATE)
