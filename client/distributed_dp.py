"""Distributed DP through SecAgg+, the site's side (`dp-mode = "distributed"`).

Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021 (arXiv 2102.06387). One round is one DP-SGD
step of the whole federation. Site i draws a Poisson sample B_i of its records at rate q
(`dp-sample-rate`), clips each example's head gradient to norm C (`dp-max-grad-norm`),
sums them and adds its share of the noise:

    s_i = sum_{j in B_i} clip_C(g_j) + N(0, sigma^2 C^2 / t)

where t is the reconstruction threshold of this round's SecAgg+ protocol, read from the
protocol's own state at the site (`secagg_setup.py`), not from the coordinator's config.
The coordinator can unmask only a sum over k >= t sites, so the sum carries noise of
variance k sigma^2 C^2 / t >= sigma^2 C^2: at least that of one central DP-SGD step with
multiplier sigma over the union of all sites' records, whichever sites drop out. Each
site's accountant counts (sigma, q) per round, so its ε is that of central DP-SGD; the
ε of its own share alone (sigma / sqrt(t)) is reported beside it as `dp_epsilon_own_noise`.

Wire: the site sends x - s_i / w_i with weight w_i = round(q n_i), its expected batch;
SecAgg+'s weighted mean is x - sum_i s_i / sum_i w_i, the noisy mean gradient, on which
the coordinator's server Adam steps (`server/distributed_dp.py`).

Trust assumption: the sites in the sum add their shares as the protocol says (semi-honest),
and the coordinator learns nothing but the SecAgg+ sum. A site that does not trust the
others' noise relies on its own-noise ε, or should run `dp-mode = "local"`. The analysis
treats the noise as continuous; SecAgg+ then rounds each site's values stochastically to
steps of 2 C_s / Q (about 2e-6 with the defaults), which the paper's discrete Gaussian
accounts for and this implementation does not. Only the head is trained (`dp-head-only`),
on features cached once per run (`head_features.py`), and every site needs every other as a
share holder (`secagg-num-shares` = 1.0), where SecAgg+'s guarantee is the plain SecAgg one.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from peft import PeftModel

from fedtune.config import RunSettings
from fedtune.errors import FedtuneError

from .dp_history import History
from .dp_trainer import (
    DPReport,
    accountant_for,
    epsilon_now_and_after,
    epsilon_of,
    noise_multiplier_for,
    private_generators,
)
from .head_features import trainable_head
from .secagg_setup import SecAggSetup
from .trainer import TrainResult

log = logging.getLogger("fedtune.site")


def noise_share_multiplier(noise_multiplier: float, threshold: int) -> float:
    """The multiplier of one site's share: t shares of variance sigma^2 / t sum to sigma^2."""
    return noise_multiplier / math.sqrt(threshold)


def expected_batch(settings: RunSettings, num_examples: int) -> int:
    """The site's weight w_i: its expected Poisson batch, at least 1."""
    return max(1, round(settings.dp_sample_rate * num_examples))


def checked_threshold(setup: SecAggSetup | None, site: str) -> int:
    """The threshold to size the noise share by; refuses a round the noise would not cover."""
    if setup is None:
        raise FedtuneError(
            f"site {site}: dp-mode = distributed, but this round came without SecAgg+; its noise "
            f"share alone would be seen, so the site refuses to train"
        )
    if setup.share_num < setup.sample_num:
        raise FedtuneError(
            f"site {site}: dp-mode = distributed needs every site to share its secrets with every "
            f"other (secagg-num-shares = 1.0); this round shares with {setup.share_num} of "
            f"{setup.sample_num}"
        )
    if setup.threshold < 2:
        raise FedtuneError(
            f"site {site}: SecAgg+ reconstruction threshold {setup.threshold} would let one site's "
            f"noise share be unmasked alone"
        )
    return setup.threshold


def own_share_history(history: History, threshold: int) -> History:
    """The accountant history as the site's own shares alone saw it: sigma / sqrt(t) each round."""
    return [(noise_share_multiplier(noise, threshold), rate, steps) for noise, rate, steps in history]


def own_noise_epsilon(settings: RunSettings, history: History, threshold: int) -> float:
    """ε of the site's records counting only its own noise shares."""
    return epsilon_of(accountant_for(settings, own_share_history(history, threshold)), settings.dp_delta)


def epsilon_after_round(
    settings: RunSettings, num_rounds: int, history: History, own_shares_of: int = 0
) -> tuple[float, float]:
    """(ε spent so far, ε after one more round): what a site's ceiling is checked against.
    With `own_shares_of` = t, counting only the site's own shares (sigma / sqrt(t))."""
    noise = noise_multiplier_for(settings, settings.dp_sample_rate, num_rounds)
    if own_shares_of:
        history, noise = own_share_history(history, own_shares_of), noise_share_multiplier(noise, own_shares_of)
    return epsilon_now_and_after(settings, history, noise, settings.dp_sample_rate, 1)


def train_head_distributed_dp(
    model: PeftModel,
    features: torch.Tensor,
    labels: torch.Tensor,
    settings: RunSettings,
    server_round: int,
    num_rounds: int,
    threshold: int,
    history: History,
    logit_mask: torch.Tensor | None = None,
    site: str = "site",
) -> tuple[TrainResult, History, DPReport, int]:
    """One round: the head of `model` becomes x - s_i / w_i (in place). Returns the loss
    figures, the updated accountant history, the ε report and the weight w_i."""
    n = len(labels)
    q = settings.dp_sample_rate
    weight = expected_batch(settings, n)
    noise = noise_multiplier_for(settings, q, num_rounds)
    share = noise_share_multiplier(noise, threshold)
    head = trainable_head(model)
    work = copy.deepcopy(head).float().train()
    rng, noise_source = private_generators()
    gsm = GradSampleModule(work)
    # Plain SGD with rate 1 over the noisy sum / w_i: the site's update is the noisy gradient itself.
    optimizer = DPOptimizer(
        torch.optim.SGD(work.parameters(), lr=1.0),
        noise_multiplier=share,
        max_grad_norm=settings.dp_max_grad_norm,
        expected_batch_size=weight,
        generator=noise_source,
    )
    chosen = torch.from_numpy(rng.random(n) < q).nonzero().squeeze(-1)
    loss_value = float("nan")
    try:
        if len(chosen):
            logits = gsm(features[chosen].to(head.weight.device))
            if logit_mask is not None:
                logits = logits + logit_mask
            loss = torch.nn.functional.cross_entropy(logits, labels[chosen].to(logits.device))
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
        else:  # an empty draw still sends its noise share, or the sum would be under-noised
            with torch.no_grad():
                for p in work.parameters():
                    noise_draw = torch.normal(0.0, share * settings.dp_max_grad_norm, p.shape, generator=noise_source)
                    p.sub_(noise_draw.to(p.device) / weight)
    finally:
        gsm.remove_hooks()
    with torch.no_grad():
        head.weight.copy_(work.weight.to(head.weight.dtype))
        if head.bias is not None and work.bias is not None:
            head.bias.copy_(work.bias.to(head.bias.dtype))
    accountant = accountant_for(settings, history)
    accountant.step(noise_multiplier=noise, sample_rate=q)
    report = DPReport(*epsilon_now_and_after(settings, accountant.history, noise, q, 1), noise, q)
    log.info(
        "%s round %d: distributed DP step on %d examples, noise share %.3f (sigma %.3f / sqrt %d), q %.4f, "
        "epsilon %.3f (delta %g)",
        site,
        server_round,
        len(chosen),
        share,
        noise,
        threshold,
        q,
        report.epsilon,
        settings.dp_delta,
    )
    result = TrainResult(loss=loss_value, first_loss=loss_value, last_loss=loss_value, num_examples=weight, steps=1)
    return result, list(accountant.history), report, weight
