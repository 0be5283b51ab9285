"""Splitting one data set across simulated sites (IID or Dirichlet over labels) and
each site's seeded train/validation split."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def iid_partition(num_items: int, num_parts: int, seed: int) -> list[list[int]]:
    """Shuffle indices with `seed` and deal them into `num_parts` near-equal parts."""
    order = np.random.default_rng(seed).permutation(num_items)
    return [sorted(part.tolist()) for part in np.array_split(order, num_parts)]


def dirichlet_partition(
    labels: Sequence[int], num_parts: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Label-skewed split: each label's items go to parts in Dirichlet(alpha) shares.

    Parts are disjoint and together cover every index. Draws repeat (same seed stream)
    until every part holds at least `min_size` items, so small alphas stay usable.
    """
    if num_parts < 1:
        raise ValueError("num_parts must be >= 1")
    labels_arr = np.asarray(labels)
    if len(labels_arr) < num_parts * min_size:
        raise ValueError(f"{len(labels_arr)} items cannot fill {num_parts} parts of {min_size}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for label in np.unique(labels_arr):
            idx = np.flatnonzero(labels_arr == label)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"could not draw {num_parts} parts of >= {min_size} items with alpha={alpha}")


def train_val_split(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded split of a site's examples into (train, validation)."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(round(len(items) * val_fraction))
    if val_fraction > 0 and len(items) > 1:
        n_val = min(max(n_val, 1), len(items) - 1)
    val_idx = set(order[:n_val].tolist())
    train = [items[i] for i in range(len(items)) if i not in val_idx]
    val = [items[i] for i in sorted(val_idx)]
    return train, val
