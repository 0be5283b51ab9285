"""Distributed DP through SecAgg+, the coordinator's side: server Adam on the noisy mean
gradient (`dp-mode = "distributed"`; the sites' side and the paper are in the site's
`distributed_dp.py`).

Each site sends x_t - s_i / w_i, where s_i is its clipped gradient sum plus its noise
share and w_i its expected batch; SecAgg+ returns only their w-weighted mean

    x_bar = x_t - (sum_i s_i) / (sum_i w_i) = x_t - g_t,

so x_bar - x_t = -g_t is a DP-SGD step's noisy mean gradient over all sites' records.
Flower's FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) takes it
as its pseudo-gradient:

    m_t = b1 m_{t-1} + (1 - b1)(-g_t),   v_t = b2 v_{t-1} + (1 - b2) g_t^2,
    x_{t+1} = x_t + eta_t m_t / (sqrt(v_t) + tau),

with eta = `dp-learning-rate`, the same Adam learning rate a site uses under
`dp-mode = "local"`. tau is Adam's epsilon, not FedAdam's default 1e-3: the mean
gradient's entries are about 1e-3 here, and a tau of that size would halve the step.
Adam is post-processing of the released sums, so it costs no privacy.
"""

from __future__ import annotations

from typing import Any

from flwr.server.strategy import FedAdam

from fedtune.config import RunSettings

ADAM_BETAS = (0.9, 0.99)
ADAM_TAU = 1e-8


def distributed_dp_strategy(settings: RunSettings, **common: Any) -> FedAdam:
    """FedAdam stepping `dp-learning-rate` on each round's noisy mean gradient."""
    return FedAdam(
        eta=settings.dp_peak_learning_rate,
        eta_l=1.0,
        beta_1=ADAM_BETAS[0],
        beta_2=ADAM_BETAS[1],
        tau=ADAM_TAU,
        **common,
    )
