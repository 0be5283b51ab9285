"""Grouping texts of similar length so a batch is not padded to its longest member.

Pure Python, so both the torch-free device runtime and the DP-SGD trainer use it.
"""

from __future__ import annotations

from typing import Sequence


def length_buckets(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that each group's padded size (rows x longest) stays within
    `max_tokens`; an item longer than the budget gets a group of its own. Shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
