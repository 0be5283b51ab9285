"""Sites with different LoRA ranks under FFA-LoRA (`hetero-ranks`). The federation's adapter
has rank r = `lora-r`; every site holds the same frozen A (seeded, r rows), so a site that
affords r_k < r trains only the first r_k columns of each B and keeps the rest at zero: its
product B A is a rank-r_k adapter in the federation's shape. It sends B with a column-weight
vector (1 for the columns it trained, 0 beyond), which travels like B, masked under SecAgg+.
Averaged over the sites with their example weights, that vector gives, per column, the share
of weight that trained it; dividing each column of the averaged B by it is the mean over the
sites that trained the column, computed from the masked sum alone (`column_weighted`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

LORA_B = ".lora_B."


def lora_b_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA B matrices (out x r: the rank is the column dimension)."""
    return [p for name, p in model.named_parameters() if LORA_B in name and p.requires_grad and p.dim() == 2]


@contextmanager
def trained_rank(model: torch.nn.Module, rank: int, full_rank: int) -> Iterator[None]:
    """Inside: every B's columns from `rank` on are zero and get no gradient (AdamW leaves a
    zero with a zero gradient at zero), so training touches the first `rank` columns only."""
    if rank >= full_rank:
        yield
        return
    weights = lora_b_weights(model)
    with torch.no_grad():
        for w in weights:
            w[:, rank:] = 0

    def keep_first(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, rank:] = 0
        return grad

    hooks = [w.register_hook(keep_first) for w in weights]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def column_weights(rank: int, full_rank: int) -> np.ndarray:
    """The vector a site sends with its B: 1 for each column it trained."""
    return (np.arange(full_rank) < rank).astype(np.float32)


def lora_b_indices(keys: Sequence[str]) -> list[int]:
    """Positions of the B matrices among the wire-order adapter keys."""
    return [i for i, key in enumerate(keys) if LORA_B in key]


def column_weighted(
    averaged: Sequence[np.ndarray], b_indices: Sequence[int], previous: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """The aggregate from the sites' weighted mean (adapter arrays, then the mean column
    weights, last): each B column divided by the share of weight that trained it; a column
    no site trained this round keeps its previous value."""
    *arrays, share = [np.asarray(a) for a in averaged]
    out = [a.copy() for a in arrays]
    trained = share > 1e-3  # SecAgg+ rounds a zero share to +-2e-6; a real one is a site's weight fraction
    for i in b_indices:
        column = np.where(trained, share, 1.0).astype(out[i].dtype)
        out[i] = np.where(trained[None, :], out[i] / column[None, :], previous[i]).astype(out[i].dtype)
    return out
