"""Sites of different LoRA ranks (`hetero-ranks`). The federation's adapter has rank r =
`lora-r`; a site that affords r_k < r trains only the first r_k components of it: the first
r_k columns of each B (and, where A trains, rows of A), the rest kept at the global values.
It sends what it trained, the rest zeroed, and a column-weight vector (1 for the
components it trained, 0 beyond), which travels like the factors, masked under SecAgg+.
Averaged over the sites with their example weights, that vector gives, per component, the
share of weight that trained it; dividing each column of the averaged B (and row of A) by
it is the mean over the sites that trained it, computed from the masked sum alone
(`column_weighted`).

Under FFA-LoRA (A frozen and shared) the sites' adapters differ only in B, so that is the
exact component-wise mean of the sites' adapters B_k A, with no error from averaging two
factors apart. With A trained it is zero-padding in the manner of HetLoRA (Cho et al.,
2024), whose mean of factors only approximates a mean of products; without SecAgg+ the
coordinator can instead average the products themselves and hand the sites the best
rank-r factors of that mean (`svd_redistributed`, FlexLoRA, Bai et al., 2024)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

LORA_A = ".lora_A."
LORA_B = ".lora_B."


def lora_b_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA B matrices (out x r: the rank is the column dimension)."""
    return [p for name, p in model.named_parameters() if LORA_B in name and p.requires_grad and p.dim() == 2]


def lora_a_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA A matrices (r x in: the rank is the row dimension); none under FFA-LoRA."""
    return [p for name, p in model.named_parameters() if LORA_A in name and p.requires_grad and p.dim() == 2]


def _rank_slices(model: torch.nn.Module, rank: int) -> list[tuple[torch.nn.Parameter, tuple[slice, ...]]]:
    """Each trainable factor with the part a site of `rank` does not train."""
    beyond = slice(rank, None)
    return [(w, (slice(None), beyond)) for w in lora_b_weights(model)] + [(w, (beyond,)) for w in lora_a_weights(model)]


@contextmanager
def trained_rank(model: torch.nn.Module, rank: int, full_rank: int) -> Iterator[None]:
    """Inside: every B's columns from `rank` on, and a trained A's rows from `rank` on, get
    no gradient and keep the global values (restored on the way out, past AdamW's weight
    decay): the site trains the first `rank` components of the global adapter, on top of
    the rest of it, so its local model is the global one plus its own update."""
    if rank >= full_rank:
        yield
        return
    parts = _rank_slices(model, rank)

    def frozen(where: tuple[slice, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        def keep_trained(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[where] = 0
            return grad

        return keep_trained

    kept = [(w, where, w[where].detach().clone()) for w, where in parts]
    hooks = [w.register_hook(frozen(where)) for w, where in parts]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for w, where, values in kept:
                w[where] = values


def zero_untrained(model: torch.nn.Module, rank: int) -> None:
    """Zero what a site of `rank` did not train (B's columns and A's rows beyond it) before
    its factors travel: the sum over sites holds only the trainers' values."""
    with torch.no_grad():
        for w, where in _rank_slices(model, rank):
            w[where] = 0


def column_weights(rank: int, full_rank: int) -> np.ndarray:
    """The vector a site sends with its B: 1 for each column it trained."""
    return (np.arange(full_rank) < rank).astype(np.float32)


def lora_b_indices(keys: Sequence[str]) -> list[int]:
    """Positions of the B matrices among the wire-order adapter keys."""
    return [i for i, key in enumerate(keys) if LORA_B in key]


def lora_a_indices(keys: Sequence[str]) -> list[int]:
    """Positions of the A matrices among the wire-order adapter keys (none under FFA-LoRA)."""
    return [i for i, key in enumerate(keys) if LORA_A in key]


def lora_pairs(keys: Sequence[str]) -> list[tuple[int, int]]:
    """(A, B) positions of each LoRA module among the wire-order adapter keys."""
    where = {key: i for i, key in enumerate(keys)}
    return [(i, where[key.replace(LORA_A, LORA_B)]) for i, key in enumerate(keys) if LORA_A in key]


def column_weighted(
    averaged: Sequence[np.ndarray],
    b_indices: Sequence[int],
    previous: Sequence[np.ndarray],
    a_indices: Sequence[int] = (),
) -> list[np.ndarray]:
    """The aggregate from the sites' weighted mean (adapter arrays, then the mean column
    weights, last): each B column (and row of a trained A) divided by the share of weight
    that trained it; one no site trained this round keeps its previous value."""
    *arrays, share = [np.asarray(a) for a in averaged]
    out = [a.copy() for a in arrays]
    trained = share > 1e-3  # SecAgg+ rounds a zero share to +-2e-6; a real one is a site's weight fraction
    divisor = np.where(trained, share, 1.0)
    for indices, shape in ((b_indices, (1, -1)), (a_indices, (-1, 1))):
        for i in indices:
            keep, by = trained.reshape(shape), divisor.reshape(shape).astype(out[i].dtype)
            out[i] = np.where(keep, out[i] / by, previous[i]).astype(out[i].dtype)
    return out


def svd_redistributed(
    sites: Sequence[Sequence[np.ndarray]], weights: Sequence[float], pairs: Sequence[tuple[int, int]], rank: int
) -> list[np.ndarray]:
    """FlexLoRA's aggregate from each site's adapter arrays (not a masked sum): per LoRA
    module the weighted mean of the sites' products B_k A_k, factored by SVD into the best
    rank-`rank` B = U sqrt(S), A = sqrt(S) V^T (the leading components first, so a site of
    rank r_k trains the r_k strongest); every other array, the weighted mean."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = [sum(wk * np.asarray(a[i], dtype=np.float64) for wk, a in zip(w, sites)) for i in range(len(sites[0]))]
    for ia, ib in pairs:
        product = sum(wk * (np.asarray(a[ib], np.float64) @ np.asarray(a[ia], np.float64)) for wk, a in zip(w, sites))
        u, s, vt = np.linalg.svd(product, full_matrices=False)
        root = np.sqrt(s[:rank])
        out[ib] = u[:, :rank] * root[None, :]
        out[ia] = root[:, None] * vt[:rank]
    return [np.asarray(a, dtype=np.asarray(sites[0][i]).dtype) for i, a in enumerate(out)]
