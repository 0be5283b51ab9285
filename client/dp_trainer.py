"""Sample-level differential privacy at a site: DP-SGD with Opacus (per-example
clipping, Gaussian noise, Poisson sampling) and its RDP or PRV accountant (`dp-accountant`).

Poisson sampling and noise draw from the operating system's entropy, not from the run's
`seed`: the coordinator sets the seed, and noise it could replay protects nothing. A DP
round is therefore not reproducible, by design.

The accountant's history (noise multiplier, sample rate, steps) is kept by
`dp_history.py`, in the site's Flower context or its worker's memory and on its disk,
so ε accumulates over rounds and across restarts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from peft import PeftModel

from fedtune.config import RunSettings
from fedtune.encoding import Encoder, example_lengths
from fedtune.errors import ConfigError
from fedtune.length_buckets import length_buckets
from fedtune.schedule import round_progress

from .dp_history import History
from .head_features import Features, trainable_head
from .trainer import (
    TrainResult,
    absent_label_mask,
    set_scheduled_lr,
    steps_for_round,
    summarize_losses,
    training_loss,
)

log = logging.getLogger("fedtune.site")
PHYSICAL_BATCH_TOKENS = 512  # padded tokens per forward pass inside one DP-SGD step


@dataclass(frozen=True)
class DPReport:
    """What a DP round reports: ε spent so far, ε after one more such round, noise."""

    epsilon: float
    epsilon_next_round: float
    noise_multiplier: float
    sample_rate: float

    def metrics(self) -> dict[str, float]:
        """The figures a site reports with its update."""
        return {
            "dp_epsilon": self.epsilon,
            "dp_epsilon_next": self.epsilon_next_round,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_sample_rate": self.sample_rate,
        }


def noise_multiplier_for(settings: RunSettings, sample_rate: float, total_steps: int) -> float:
    """The configured noise multiplier, or the one that spends `dp-target-epsilon`
    over all rounds' steps."""
    if settings.dp_noise_multiplier > 0:
        return settings.dp_noise_multiplier
    if settings.dp_target_epsilon <= 0:
        raise ConfigError("dp-target-epsilon", "set dp-noise-multiplier or dp-target-epsilon when dp is on")
    return float(
        get_noise_multiplier(
            target_epsilon=settings.dp_target_epsilon,
            target_delta=settings.dp_delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=settings.dp_accountant,
        )
    )


def accountant_for(settings: RunSettings, history: History) -> IAccountant:
    """The run's accountant (`dp-accountant`: Opacus' RDP or PRV) with the site's history."""
    accountant = create_accountant(settings.dp_accountant)
    accountant.history = list(history)
    return accountant


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    """ε for `delta` after the accountant's history; 0 before any step."""
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def epsilon_now_and_after(
    settings: RunSettings, history: History, noise: float, sample_rate: float, steps: int
) -> tuple[float, float]:
    """(ε after `history`, ε after `steps` more steps at (noise, sample_rate))."""
    accountant = accountant_for(settings, history)
    now = epsilon_of(accountant, settings.dp_delta)
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
    return now, epsilon_of(accountant, settings.dp_delta)


def private_generators() -> tuple[np.random.Generator, torch.Generator]:
    """Random sources for Poisson sampling and noise, seeded from the OS's entropy."""
    noise = torch.Generator()
    noise.manual_seed(secrets.randbits(63))
    return np.random.default_rng(secrets.randbits(128)), noise


def dp_recipe(settings: RunSettings) -> RunSettings:
    """The settings DP-SGD trains with: `dp-batch-size`, `dp-learning-rate` and
    `dp-local-epochs` in place of `batch-size`, `learning-rate` and `local-epochs` where
    set. DP-SGD wants larger logical batches than plain training: the noise on the mean
    gradient falls as 1/batch. `min-local-steps` does not apply: every DP step spends
    privacy, so DP local work is its local epochs over the DP batch (or `local-steps`)."""
    return dataclasses.replace(
        settings,
        min_local_steps=0,
        batch_size=settings.dp_batch,
        learning_rate=settings.dp_peak_learning_rate,
        local_epochs=settings.dp_epochs,
    )


def dp_step(
    gsm: GradSampleModule,
    optimizer: DPOptimizer,
    encoder: Encoder,
    idx: list[int],
    lengths: list[int],
    logit_mask: torch.Tensor | None,
    device: torch.device,
) -> float:
    """One DP-SGD step over the Poisson batch `idx`; returns its mean loss.

    The batch runs as physical batches of similar length (`fedtune.length_buckets`), so short
    examples are not padded to the longest one. Per-example clipping makes this exact: each
    physical batch's clipped per-example gradients are summed (Opacus' skipped steps), and
    noise is added and the sum scaled once, at the last physical batch.
    """
    groups = length_buckets([lengths[i] for i in idx], PHYSICAL_BATCH_TOKENS)
    total = 0.0
    for k, group in enumerate(groups):
        rows = [idx[j] for j in group]
        batch = {key: value.to(device) for key, value in encoder.batch(rows).items()}
        loss = training_loss(gsm, batch, logit_mask, device)
        loss.backward()
        total += float(loss.detach()) * len(rows)
        optimizer.signal_skip_step(do_skip=k + 1 < len(groups))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total / len(idx)


def dp_head_step(
    gsm: GradSampleModule, optimizer: DPOptimizer, features: Features, idx: list[int], logit_mask: torch.Tensor | None
) -> float:
    """One DP-SGD step of the head alone over the cached features of the Poisson batch `idx`."""
    inputs, labels = features
    device = next(gsm.parameters()).device
    logits = gsm(inputs[idx].to(device))
    if logit_mask is not None:
        logits = logits + logit_mask
    loss = torch.nn.functional.cross_entropy(logits, labels[idx].to(device))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def epsilon_after_round(
    settings: RunSettings, num_examples: int, num_rounds: int, history: History
) -> tuple[float, float]:
    """(ε spent so far, ε after one more round of this run's DP-SGD) by the site's own
    accountant, before training: what a site's privacy ceiling is checked against."""
    settings = dp_recipe(settings)
    steps = steps_for_round(settings, num_examples)
    sample_rate = min(1.0, settings.batch_size / num_examples)
    noise = noise_multiplier_for(settings, sample_rate, steps * num_rounds)
    return epsilon_now_and_after(settings, history, noise, sample_rate, steps)


def train_local_dp(
    model: PeftModel,
    encoder: Encoder,
    settings: RunSettings,
    server_round: int,
    num_rounds: int,
    history: History,
    site: str = "site",
    features: Features | None = None,
) -> tuple[TrainResult, History, DPReport]:
    """One round of DP-SGD on a private copy of the model; returns the trained copy's
    result, the updated accountant history and the ε report. The caller reads the
    adapter from `model`, which is updated in place from the copy.

    With `features` (`dp-head-only`: the head's inputs, `head_features.py`) the copy is the
    head alone and each step a forward pass of the head over the sampled rows."""
    settings = dp_recipe(settings)
    n = len(encoder)
    steps = steps_for_round(settings, n)
    sample_rate = min(1.0, settings.batch_size / n)
    noise = noise_multiplier_for(settings, sample_rate, steps * num_rounds)
    target: torch.nn.Module = model if features is None else trainable_head(model)
    work = copy.deepcopy(target)  # Opacus hooks go on a copy; the cached model stays clean
    if features is not None:
        work.float()  # the cached features are fp32
    work.train()
    device = next(work.parameters()).device
    params = [p for p in work.parameters() if p.requires_grad]
    gsm = GradSampleModule(work)
    rng, noise_source = private_generators()
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay),
        noise_multiplier=noise,
        max_grad_norm=settings.dp_max_grad_norm,
        expected_batch_size=settings.batch_size,
        generator=noise_source,
    )
    accountant = accountant_for(settings, history)
    logit_mask = absent_label_mask(model, encoder, device) if settings.restricted_softmax else None
    lengths = example_lengths(encoder)
    losses: list[float] = []
    try:
        for step in range(steps):
            set_scheduled_lr(optimizer, settings, round_progress(server_round, step, steps, num_rounds))
            idx = np.flatnonzero(rng.random(n) < sample_rate).tolist()  # Poisson sampling
            accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
            if not idx:
                continue  # an empty draw: skipping it spends less privacy than accounted
            if features is None:
                losses.append(dp_step(gsm, optimizer, encoder, idx, lengths, logit_mask, device))
            else:
                losses.append(dp_head_step(gsm, optimizer, features, idx, logit_mask))
    finally:
        gsm.remove_hooks()
    with torch.no_grad():
        for (_, into), (_, source) in zip(target.named_parameters(), work.named_parameters()):
            if into.requires_grad:
                into.copy_(source.to(into.dtype))
    epsilon, epsilon_next = epsilon_now_and_after(settings, accountant.history, noise, sample_rate, steps)
    report = DPReport(epsilon, epsilon_next, noise, sample_rate)
    log.info(
        "%s round %d: DP-SGD %d steps, noise %.3f, q %.4f, epsilon %.3f (delta %g)",
        site,
        server_round,
        steps,
        noise,
        sample_rate,
        epsilon,
        settings.dp_delta,
    )
    return summarize_losses(losses, n, steps), list(accountant.history), report
