"""Test-only hooks, off unless their environment variable is set on the site.

- FEDTUNE_TEST_AUDIT_DIR: the site also writes its unmasked reply (adapter arrays and
  example count) to this local folder, so a test can compare what SecAgg+ delivered
  with what the sites sent. It never sends anything anywhere.
- FEDTUNE_TEST_FAIL_AT: "SITE@ROUND[,SITE@ROUND...]": that site raises in that round's
  training, to test dropouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

AUDIT_ENV = "FEDTUNE_TEST_AUDIT_DIR"
FAIL_ENV = "FEDTUNE_TEST_FAIL_AT"


def maybe_fail(site: str, server_round: int) -> None:
    """Raise if the test asked this site to fail in this round."""
    wanted = {item.strip() for item in os.environ.get(FAIL_ENV, "").split(",") if item.strip()}
    if f"{site}@{server_round}" in wanted:
        raise RuntimeError(f"test hook: {site} fails in round {server_round}")


def maybe_audit(
    site: str, server_round: int, arrays: list[np.ndarray], num_examples: int,
    full_adapter: Callable[[], list[np.ndarray]],
) -> None:
    """Write the site's unmasked reply (and its whole adapter, A included) locally when
    the audit folder is set."""
    folder = os.environ.get(AUDIT_ENV)
    if not folder:
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / f"{site}-round{server_round:03d}.npz", num_examples=num_examples,
             **{f"a{i:04d}": a for i, a in enumerate(arrays)},
             **{f"full{i:04d}": a for i, a in enumerate(full_adapter())})
