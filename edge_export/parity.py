"""The parity gate: the merged PyTorch fp32 model against the device runtime on held-out
data.

seq-cls: top-1 agreement, accuracy of each, and the largest |delta logit|.
causal-lm: greedy completions of the merged PyTorch fp32 model against the INT4 model on
the device runtime (onnxruntime-genai): exact match of each, and their agreement.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.data import ClassificationExample, CompletionExample
from fedtune.edge_device.generative import GenerationOptions, GenerativeModel
from fedtune.edge_device.runtime import EdgeModel
from fedtune.encoding import CompletionEncoder
from fedtune.generation import greedy_completions
from fedtune.metrics import exact_match, normalize_answer


@torch.no_grad()
def classification_parity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    edge: EdgeModel,
    examples: Sequence[ClassificationExample],
    max_length: int,
    batch_size: int = 64,
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


def generation_parity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    device_model: GenerativeModel,
    examples: Sequence[CompletionExample],
    max_length: int,
    system_prompt: str,
    max_new_tokens: int,
) -> dict[str, float]:
    """Greedy completions of PyTorch fp32 (transformers `generate`) and of the device runtime
    on the same prompts; exact match of each against the references, and how often the two
    completions agree. The prompts are checked to tokenise the same on both sides."""
    encoder = CompletionEncoder(tokenizer, examples, max_length, system_prompt)
    prompts = [encoder.prompt_ids(e.prompt) for e in examples]
    mismatched = sum(device_model.prompt_ids(e.prompt) != ids for e, ids in zip(examples, prompts))
    reference = greedy_completions(model, tokenizer, prompts, max_new_tokens)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    candidate = [
        device_model.generate(e.prompt, options).strip()
        for e in tqdm(examples, desc="parity", unit="prompt", leave=False)
    ]
    gold = [e.completion for e in examples]
    torch_em, device_em = exact_match(reference, gold), exact_match(candidate, gold)
    agree = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(reference, candidate))
    return {
        "examples": len(examples),
        "max_new_tokens": max_new_tokens,
        "prompt_token_mismatches": mismatched,
        "torch_exact_match": torch_em,
        "device_exact_match": device_em,
        "completion_agreement": agree / max(len(examples), 1),
        # from the counts, as for classification: 3 of 300 is 1.0 pt, not 1.0000000000000009 (over a 1-pt gate)
        "accuracy_drop_pt": 100.0 * round((torch_em - device_em) * len(examples)) / max(len(examples), 1),
    }
