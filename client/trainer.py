"""Local LoRA training at a site: AdamW (its moments optionally kept from round to round),
a federation-wide LR schedule, optional FedProx proximal term; returns only aggregate figures."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from peft import PeftModel

from fedtune.chunked_loss import chunked_completion_loss, lm_parts
from fedtune.config import RunSettings
from fedtune.encoding import (
    IGNORE_INDEX,
    ClassificationEncoder,
    Encoder,
    batch_indices,
    example_lengths,
    length_grouped_batches,
)
from fedtune.precision import autocast_for, compute_dtype
from fedtune.schedule import lr_factor, round_progress

from .optimizer_state import OptimizerStore, optimizer_arrays, restore_optimizer
from .site_ranks import RankShard

log = logging.getLogger("fedtune.site")


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training reports: mean loss, examples, steps."""

    loss: float
    first_loss: float
    last_loss: float
    num_examples: int
    steps: int


def steps_for_round(settings: RunSettings, num_examples: int) -> int:
    """Local steps this round: `local-steps`, else `local-epochs` over the site's data,
    and at least `min-local-steps`.

    The floor is for small sites: half an epoch of 200 examples is 4 steps of 32, so
    without it the global model of a federation of small sites moves a fraction of what
    a centralised run of the same sample budget does (bench/small_data.py). Sites large
    enough to take the floor's steps anyway (the Banking77 demo's take 40-51) are
    unaffected."""
    if settings.local_steps > 0:
        return settings.local_steps
    epochs_steps = math.ceil(settings.local_epochs * num_examples / settings.batch_size)
    return max(1, epochs_steps, settings.min_local_steps)


def train_local(
    model: PeftModel,
    encoder: Encoder,
    settings: RunSettings,
    server_round: int,
    num_rounds: int,
    site: str = "site",
    proximal_mu: float = 0.0,
    seed: int = 0,
    optimizer_store: OptimizerStore | None = None,
    shard: RankShard | None = None,
    on_step: Callable[[float, float], None] | None = None,
) -> TrainResult:
    """Train the trainable (adapter + head) parameters in place for one round. With an
    `optimizer_store`, AdamW starts from the moments the site kept last round and keeps its own.
    With a `shard` (one of a site's ranks, `site_ranks.py`), this process trains on its slice
    of each global batch and the ranks' gradients are averaged before each step. `on_step`
    hears each step's loss and learning rate (the site's own curves)."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    anchors: Sequence[torch.Tensor] = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    kept = optimizer_store.load() if optimizer_store is not None else None
    if kept is not None and restore_optimizer(optimizer, params, kept, site):
        log.info("%s round %d: AdamW goes on from the moments kept last round", site, server_round)
    steps = steps_for_round(settings, len(encoder))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # dropout: a round's training depends only on (seed, site, round), so resumes replay it
    lengths = example_lengths(encoder) if settings.group_by_length else None
    batches = _endless_batches(len(encoder), settings.batch_size, rng, lengths)
    report_every = max(1, steps // 4)
    losses: list[float] = []
    logit_mask = absent_label_mask(model, encoder, device) if settings.restricted_softmax else None
    model.train()
    for step in range(steps):
        set_scheduled_lr(optimizer, settings, round_progress(server_round, step, steps, num_rounds))
        indices = next(batches)
        if shard is not None:
            indices = shard.split(indices)
        batch = {k: v.to(device) for k, v in encoder.batch(indices).items()} if indices else None
        weight = 1.0 if shard is None else shard.loss_weight(batch, device)
        value = 0.0
        if batch is not None:
            loss = training_loss(model, batch, logit_mask, device)
            if proximal_mu > 0:
                loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
            (loss * weight).backward()
            value = float(loss.detach()) * weight
        if shard is not None:
            value = shard.average(params, value)  # the whole global batch's gradient and loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        if on_step is not None:
            on_step(value, float(optimizer.param_groups[0]["lr"]))
        if (step + 1) % report_every == 0 or step + 1 == steps:
            log.info(
                "%s round %d: step %d/%d loss %.4f",
                site,
                server_round,
                step + 1,
                steps,
                float(np.mean(losses[-report_every:])),
            )
    if optimizer_store is not None:
        optimizer_store.save(optimizer_arrays(optimizer, params))
    return summarize_losses(losses, len(encoder), steps)


def set_scheduled_lr(optimizer: torch.optim.Optimizer, settings: RunSettings, progress: float) -> None:
    """Set the federation-wide schedule's LR for `progress` in [0, 1] of all rounds."""
    for group in optimizer.param_groups:
        group["lr"] = settings.learning_rate * lr_factor(progress, settings.lr_schedule, settings.warmup_fraction)


def training_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], logit_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The model's own loss, cross-entropy over the restricted softmax when a mask is set,
    or, for causal LMs, the completion loss from logits at the labelled positions only."""
    with autocast_for(device, compute_dtype(model)):
        if batch["labels"].dim() == 2 and accepts_logits_to_keep(model):
            return completion_loss(model, batch)
        if logit_mask is None:
            return model(**batch).loss
        labels = batch.pop("labels")
        logits = model(**batch).logits.float() + logit_mask
        return torch.nn.functional.cross_entropy(logits, labels)


def completion_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens, as the model's own loss, with
    the LM head run only where a token is labelled: chunk by chunk, each chunk's logits
    recomputed in the backward pass (`fedtune/chunked_loss.py`), for the causal LMs whose head
    is plain; otherwise at the positions that predict a labelled token in some row
    (`logits_to_keep`). Either way a completion of a few tokens after a 30-token prompt no
    longer pays for 49k-way logits at every prompt position."""
    parts = lm_parts(model)
    if parts is not None:
        return chunked_completion_loss(
            *parts, batch["input_ids"], batch["attention_mask"], batch["labels"], IGNORE_INDEX
        )
    targets = batch["labels"][:, 1:]
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions
    ).logits.float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets[:, positions].reshape(-1), ignore_index=IGNORE_INDEX
    )


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (peft-wrapped) causal LM's forward takes `logits_to_keep` (Llama,
    Qwen, Mistral, GPT-2, ... in transformers >= 4.50)."""
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule wraps the peft model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def summarize_losses(losses: list[float], num_examples: int, steps: int) -> TrainResult:
    """Mean loss of the round, and of its first and last tenth of steps."""
    losses = losses or [float("nan")]
    head = max(1, len(losses) // 10)
    return TrainResult(
        loss=float(np.mean(losses)),
        first_loss=float(np.mean(losses[:head])),
        last_loss=float(np.mean(losses[-head:])),
        num_examples=num_examples,
        steps=steps,
    )


def absent_label_mask(model: PeftModel, encoder: Encoder, device: torch.device) -> torch.Tensor | None:
    """Restricted softmax (FedRS, Li & Zhan, KDD 2021): labels a site has no examples
    of are masked out of its training softmax, so the site neither pushes their logits
    down nor drags their classifier rows towards its own classes."""
    if not isinstance(encoder, ClassificationEncoder):
        return None
    mask = torch.full((int(model.config.num_labels),), float("-inf"), device=device)
    mask[sorted(set(encoder.labels))] = 0.0
    return mask


def _endless_batches(
    n: int, batch_size: int, rng: np.random.Generator, lengths: Sequence[int] | None
) -> Iterator[list[int]]:
    while True:
        if lengths is None:
            yield from batch_indices(n, batch_size, rng)
        else:
            yield from length_grouped_batches(lengths, batch_size, rng)
