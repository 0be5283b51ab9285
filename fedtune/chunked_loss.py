"""A causal LM's completion loss without the full logits tensor: the LM head and the
cross-entropy run over chunks of the labelled positions, each chunk's logits recomputed in
the backward pass (activation checkpointing) instead of kept. At a 49k-128k vocabulary the
logits of a batch dwarf the rest of a LoRA step (8 x 128 tokens x 128k words in fp32 is
0.5 GB, plus three times as much for softmax and gradients); chunked, one chunk's worth is live
(`CHUNK_BYTES`). The loss and gradients are those of one cross-entropy over all the
positions, up to float rounding. Liger-Kernel's fused linear cross-entropy does the same
with Triton kernels on GPUs; this is the portable form (CPU and GPU, any dtype)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 32 * 1024**2  # fp32 logits of one chunk: 170 positions at a 49k vocabulary, 65 at 128k
# Causal LMs whose logits are exactly `lm_head(final hidden state)`: no soft-capping
# (Gemma 2), logit scaling (Cohere, Granite) or other head-side transform to repeat.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "phi3", "olmo", "olmo2"}
)


def chunk_rows(vocab: int) -> int:
    """Labelled positions per chunk: CHUNK_BYTES of fp32 logits."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, LM head) of a (peft-wrapped) causal LM whose logits are the head applied
    to the decoder's last hidden state, or None (another architecture, or a model wrapped
    for per-example gradients, whose hooks expect the whole model's forward)."""
    if hasattr(model, "_module"):  # Opacus' GradSampleModule
        return None
    wrapped: Any = model
    inner: Any = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
    if getattr(inner.config, "model_type", "") not in PLAIN_HEAD_MODEL_TYPES:
        return None
    decoder, head = getattr(inner, "model", None), inner.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_completion_loss(
    decoder: torch.nn.Module,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of `labels` (as the model's
    own loss), the head applied only to those positions, a chunk at a time."""
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != ignore_index
    hidden, targets = hidden[keep], targets[keep]  # (labelled positions, hidden), (labelled positions,)
    vocab = int(getattr(head, "out_features", 0)) or int(cast(torch.Tensor, head.weight).shape[0])
    rows = chunk_rows(vocab)
    if targets.numel() <= rows:
        return _chunk_loss_sum(head, hidden, targets) / max(1, targets.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), rows):
        total = total + checkpoint(
            _chunk_loss_sum, head, hidden[start : start + rows], targets[start : start + rows], use_reentrant=False
        )
    return total / targets.numel()
