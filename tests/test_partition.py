"""Dirichlet and IID partitions: disjoint, covering, reproducible from the seed."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.partition import dirichlet_partition, iid_partition, train_val_split


def _labels(n: int = 2000, k: int = 20, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, k, size=n).tolist()


@pytest.mark.parametrize("alpha", [0.1, 0.5, 5.0])
def test_dirichlet_parts_are_disjoint_and_cover(alpha: float) -> None:
    labels = _labels()
    parts = dirichlet_partition(labels, 4, alpha, seed=7)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == len(labels)
    assert sorted(flat) == list(range(len(labels)))
    assert all(len(p) >= 1 for p in parts)


def test_dirichlet_is_reproducible_and_seed_dependent() -> None:
    labels = _labels()
    assert dirichlet_partition(labels, 3, 0.5, seed=11) == dirichlet_partition(labels, 3, 0.5, seed=11)
    assert dirichlet_partition(labels, 3, 0.5, seed=11) != dirichlet_partition(labels, 3, 0.5, seed=12)


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.array(_labels(5000, 10))

    def skew(alpha: float) -> float:
        parts = dirichlet_partition(labels.tolist(), 3, alpha, seed=0)
        shares = np.array([[np.mean(labels[p] == c) for c in range(10)] for p in parts])
        return float(np.abs(shares - shares.mean(axis=0)).mean())

    assert skew(0.1) > skew(100.0) * 3


def test_iid_partition() -> None:
    parts = iid_partition(103, 4, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert parts == iid_partition(103, 4, seed=1)


def test_train_val_split_seeded_and_disjoint() -> None:
    items = list(range(50))
    train, val = train_val_split(items, 0.2, seed=5)
    assert len(val) == 10 and sorted(train + val) == items
    assert train_val_split(items, 0.2, seed=5) == (train, val)
    assert train_val_split(items, 0.2, seed=6)[1] != val
