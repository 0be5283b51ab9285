"""Evaluating a (peft) model on encoded examples: classification metrics for seq-cls;
loss and perplexity over completion tokens, and exact match of greedy completions,
for causal-LM."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from fedtune.encoding import (
    IGNORE_INDEX,
    ClassificationEncoder,
    CompletionEncoder,
    Encoder,
    example_lengths,
)
from fedtune.generation import greedy_completions
from fedtune.metrics import classification_metrics, exact_match
from fedtune.precision import autocast_for, compute_dtype


def _sorted_batches(encoder: Encoder, batch_size: int) -> list[list[int]]:
    """Batches of similar length (sorted): less padding; metrics do not depend on order."""
    lengths = example_lengths(encoder)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    encoder: Encoder,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    max_generated: int = 0,
) -> dict[str, float]:
    """Aggregate metrics only; nothing per example is returned. For causal-LM, exact
    match covers the first `max_generated` examples (0: all), each generating at most
    `max_new_tokens` greedy tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if isinstance(encoder, ClassificationEncoder):
            return _evaluate_classification(model, encoder, batch_size, device)
        metrics = _evaluate_completion(model, encoder, batch_size, device)
        if isinstance(encoder, CompletionEncoder) and max_new_tokens > 0:
            metrics.update(_exact_match(model, encoder, max_new_tokens, max_generated))
        return metrics
    finally:
        model.train(was_training)


def _classified(
    model: PreTrainedModel, encoder: ClassificationEncoder, batch_size: int, device: torch.device
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(example indices, fp32 logits, gold labels) per batch of similar length."""
    for idx in _sorted_batches(encoder, batch_size):
        batch = {k: v.to(device) for k, v in encoder.batch(idx).items()}
        with autocast_for(device, compute_dtype(model)):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        yield idx, logits, batch["labels"]


@torch.no_grad()
def predict_labels(model: PreTrainedModel, encoder: ClassificationEncoder, batch_size: int = 64) -> np.ndarray:
    """Each example's predicted label index, in the encoder's order (for comparing one model
    with another example by example, as the release gate does at a site)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = np.empty(len(encoder), dtype=np.int64)
        for idx, logits, _ in _classified(model, encoder, batch_size, device):
            out[idx] = logits.argmax(-1).cpu().numpy()
        return out
    finally:
        model.train(was_training)


def _evaluate_classification(
    model: PreTrainedModel, encoder: ClassificationEncoder, batch_size: int, device: torch.device
) -> dict[str, float]:
    preds, golds, loss_sum = [], [], 0.0
    for _, logits, labels in _classified(model, encoder, batch_size, device):
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        preds.append(logits.argmax(-1).cpu().numpy())
        golds.append(labels.cpu().numpy())
    num_labels = int(model.config.num_labels)
    metrics = classification_metrics(np.concatenate(golds), np.concatenate(preds), num_labels)
    metrics["loss"] = loss_sum / max(len(encoder), 1)
    return metrics


def _evaluate_completion(
    model: PreTrainedModel, encoder: Encoder, batch_size: int, device: torch.device
) -> dict[str, float]:
    nll, tokens = 0.0, 0
    for idx in _sorted_batches(encoder, batch_size):
        batch = {k: v.to(device) for k, v in encoder.batch(idx).items()}
        with autocast_for(device, compute_dtype(model)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        nll += float(
            F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        tokens += int((targets != IGNORE_INDEX).sum())
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "tokens": float(tokens)}


def _exact_match(
    model: PreTrainedModel, encoder: CompletionEncoder, max_new_tokens: int, limit: int
) -> dict[str, float]:
    examples = encoder.examples[:limit] if limit > 0 else encoder.examples
    prompts = [encoder.prompt_ids(e.prompt)[-encoder.max_length :] for e in examples]
    completions = greedy_completions(model, encoder.tokenizer, prompts, max_new_tokens)
    return {
        "exact_match": exact_match(completions, [e.completion for e in examples]),
        "generated": float(len(examples)),
    }
