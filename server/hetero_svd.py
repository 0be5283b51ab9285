"""Heterogeneous LoRA ranks with `hetero-aggregation = svd`: FlexLoRA (Bai et al., "Federated
Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
NeurIPS 2024). Each site of rank r_k sends its factors; the coordinator averages the sites'
full-size products B_k A_k with their example weights and factors the mean by SVD into the
federation's rank (`fedtune/site_rank.py: svd_redistributed`), so a site of rank r_k
trains the r_k leading components next round. It needs each site's adapter, so it runs
without SecAgg+ only (the run config refuses the pair)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flwr.server.strategy import Strategy

from fedtune.site_rank import svd_redistributed

from .hetero_ranks import RankColumnsStrategy


class SvdRanksStrategy(RankColumnsStrategy):
    """The weighted mean of the sites' products, refactored to the federation's rank."""

    def __init__(
        self, inner: Strategy, pairs: Sequence[tuple[int, int]], initial: Sequence[np.ndarray], rank: int
    ) -> None:
        super().__init__(inner, [b for _, b in pairs], initial, [a for a, _ in pairs])
        self.pairs = list(pairs)
        self.rank = rank

    def combine(self, results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
        sites = [arrays[:-1] for arrays, _ in results]  # the column weights are not needed here
        return svd_redistributed(sites, [n for _, n in results], self.pairs, self.rank)
