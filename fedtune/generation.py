"""Greedy generation in batches (left-padded, KV cache via transformers' `generate`),
for exact-match evaluation of causal-LM completions."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.precision import autocast_for, compute_dtype


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """The greedy completion of each prompt (token ids), decoded without special tokens;
    generation stops at EOS. Prompts of similar length share a batch."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(prompts[i])
                ids[row, width - n :] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[row, width - n :] = 1
            with autocast_for(device, compute_dtype(model)):
                generated = model.generate(  # type: ignore[operator]
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(generated[row, width:].tolist(), skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out
