"""A classification head from public information only: the base model's own features of
the label names (Banking77's `card_arrival` read as "card arrival"), so a federation,
and DP-SGD above all, starts from a zero-shot classifier instead of a random head.

The features are what the head itself sees (a hook on its input), so any seq-cls model
whose head is one Linear layer works: BERT's pooled [CLS] (tanh of the [CLS] state with
`head-input = cls`), a decoder's last token. Each
row of the head is the label's feature vector scaled to unit length times
`LOGIT_SCALE / mean norm`, so logits are about `LOGIT_SCALE` x cosine(text, label name);
the bias is zero. Only label names and the base weights go in: no site's data, so it
spends no privacy, and every site and the coordinator compute the same head."""

from __future__ import annotations

import re
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# logits ~ 40 x cosine (softmax temperature 0.025). The scale leaves zero-shot accuracy as it
# is; under DP-SGD a larger one keeps more of the start against noisy steps: in a simulation of
# the demo's head-only DP recipe on cached MiniLM features, 20 gave 0.50 test accuracy at
# epsilon 1 and 40 gave 0.57.
LOGIT_SCALE = 40.0


def label_name_text(label: str) -> str:
    """A label as words: separators become spaces (`card_arrival` -> "card arrival")."""
    return re.sub(r"[_\-\s]+", " ", label).strip() or label


@torch.no_grad()
def label_name_features(
    base: PreTrainedModel,
    head: torch.nn.Linear,
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
    max_length: int = 64,
) -> torch.Tensor:
    """The head's input for each label name, [labels, in_features]."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    was_training = base.training
    base.eval()
    try:
        batch = tokenizer(
            [label_name_text(label) for label in labels],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v.to(head.weight.device) for k, v in batch.items()}
        base(**batch)
    finally:
        hook.remove()
        base.train(was_training)
    features = captured[0].float()
    if features.dim() == 3:  # a decoder's score layer sees every position: keep each name's last token
        last = batch["attention_mask"].sum(dim=1) - 1
        features = features[torch.arange(features.size(0)), last]
    return features


def init_label_name_head(
    base: PreTrainedModel,
    head: torch.nn.Linear,
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
    max_length: int = 64,
) -> None:
    """Overwrite `head` (in place) with the scaled, normalised label-name features."""
    features = label_name_features(base, head, tokenizer, labels, max_length)
    scale = LOGIT_SCALE / features.norm(dim=-1).mean().clamp_min(1e-6)
    with torch.no_grad():
        head.weight.copy_(torch.nn.functional.normalize(features, dim=-1) * scale)
        if head.bias is not None:
            head.bias.zero_()
