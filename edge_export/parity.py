"""The parity gate: the merged PyTorch fp32 model against the device runtime (INT8
ONNX, tokenised with `tokenizers`) on held-out data.

seq-cls: top-1 agreement, accuracy of each, and the largest |delta logit|.
causal-lm: completion-token loss and perplexity of each, greedy (argmax) next-token
agreement, and next-token accuracy against the reference completion.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fedtune.edge_device.runtime import EdgeModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.data import ClassificationExample, CompletionExample
from fedtune.encoding import IGNORE_INDEX, CompletionEncoder


@torch.no_grad()
def classification_parity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, edge: EdgeModel,
    examples: Sequence[ClassificationExample], max_length: int, batch_size: int = 64,
) -> dict[str, float]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text))  # less padding, same result
    agree = torch_right = onnx_right = 0
    max_delta = 0.0
    for start in tqdm(range(0, len(order), batch_size), desc="parity", unit="batch", leave=False):
        batch = [examples[i] for i in order[start : start + batch_size]]
        texts, gold = [e.text for e in batch], np.array([e.label for e in batch])
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        reference = model(**enc).logits.float().numpy()
        candidate = edge.logits(texts).astype(np.float32)
        max_delta = max(max_delta, float(np.abs(reference - candidate).max()))
        ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
        agree += int((ref_top == cand_top).sum())
        torch_right += int((ref_top == gold).sum())
        onnx_right += int((cand_top == gold).sum())
    n = len(examples)
    return {
        "examples": n,
        "top1_agreement": agree / n,
        "torch_accuracy": torch_right / n,
        "onnx_accuracy": onnx_right / n,
        "accuracy_drop_pt": 100.0 * (torch_right - onnx_right) / n,
        "max_abs_logit_delta": max_delta,
    }


@torch.no_grad()
def causal_lm_parity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, edge: EdgeModel,
    examples: Sequence[CompletionExample], max_length: int, system_prompt: str = "",
) -> dict[str, float]:
    encoder = CompletionEncoder(tokenizer, examples, max_length, system_prompt)
    nll = {"torch": 0.0, "onnx": 0.0}
    right = {"torch": 0, "onnx": 0}
    agree = tokens = 0
    for i in tqdm(range(len(encoder)), desc="parity", unit="example", leave=False):
        batch = encoder.batch([i])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        targets = labels[1:]
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            continue
        reference = model(input_ids=ids[None]).logits[0, :-1].float()
        candidate = torch.from_numpy(edge.sequence_logits(ids.tolist())[:-1].astype(np.float32))
        tgt = targets[keep]
        for name, logits in (("torch", reference[keep]), ("onnx", candidate[keep])):
            nll[name] += float(F.cross_entropy(logits, tgt, reduction="sum"))
            right[name] += int((logits.argmax(-1) == tgt).sum())
        agree += int((reference[keep].argmax(-1) == candidate[keep].argmax(-1)).sum())
        tokens += int(keep.sum())
    tokens = max(tokens, 1)
    return {
        "examples": len(encoder),
        "tokens": tokens,
        "torch_loss": nll["torch"] / tokens,
        "onnx_loss": nll["onnx"] / tokens,
        "torch_perplexity": math.exp(min(nll["torch"] / tokens, 50.0)),
        "onnx_perplexity": math.exp(min(nll["onnx"] / tokens, 50.0)),
        "greedy_token_agreement": agree / tokens,
        "torch_token_accuracy": right["torch"] / tokens,
        "onnx_token_accuracy": right["onnx"] / tokens,
        "accuracy_drop_pt": 100.0 * (right["torch"] - right["onnx"]) / tokens,
    }
