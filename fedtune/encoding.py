"""Turning examples into padded tensor batches: texts with labels for seq-cls, and
prompt/completion pairs whose loss covers completion tokens only for causal-LM."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data import ClassificationExample, CompletionExample
from fedtune.errors import DataError

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


class ClassificationEncoder:
    """Pre-tokenised texts; batches are padded to their longest member."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, examples: Sequence[ClassificationExample], max_length: int
    ) -> None:
        self.tokenizer = tokenizer
        self.encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        self.labels = [e.label for e in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> Batch:
        rows = [{k: self.encoded[k][i] for k in self.encoded.keys()} for i in indices]
        out = dict(self.tokenizer.pad(rows, return_tensors="pt"))
        out["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return out


class CompletionEncoder:
    """Prompt + completion token ids; labels mask the prompt (and padding) with -100.

    With a chat template the pair is a user turn and an assistant turn (after a system
    turn when `system_prompt` is set); otherwise the completion ids (plus EOS) follow the
    prompt ids directly. The examples are kept for generation metrics (exact match).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[CompletionExample],
        max_length: int,
        system_prompt: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.examples = list(examples)
        self.max_length = max_length
        self.rows = [self._encode(e, max_length) for e in examples]

    def __len__(self) -> int:
        return len(self.rows)

    def messages(self, prompt: str, completion: str | None = None) -> list[dict[str, str]]:
        """The chat turns for a pair (the assistant turn only when `completion` is given)."""
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns.append({"role": "user", "content": prompt})
        if completion is not None:
            turns.append({"role": "assistant", "content": completion})
        return turns

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a generation for `prompt` starts from (chat template when present)."""
        tok = self.tokenizer
        if tok.chat_template:
            return list(tok.apply_chat_template(self.messages(prompt), add_generation_prompt=True, tokenize=True))
        return list(tok(prompt, add_special_tokens=True)["input_ids"])

    def _encode(self, example: CompletionExample, max_length: int) -> tuple[list[int], int]:
        tok = self.tokenizer
        prompt = self.prompt_ids(example.prompt)
        if tok.chat_template:
            full = list(tok.apply_chat_template(self.messages(example.prompt, example.completion), tokenize=True))
            if full[: len(prompt)] != prompt:  # template re-renders the prompt: fall back
                full = prompt + list(tok(example.completion, add_special_tokens=False)["input_ids"])
            completion = full[len(prompt) :]
        else:
            completion = list(tok(example.completion, add_special_tokens=False)["input_ids"])
            eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
            if eos is not None:
                completion.append(eos)
        if len(prompt) + len(completion) > max_length:
            where = example.source or "<examples>"
            if len(completion) >= max_length:
                raise DataError(
                    where,
                    f"completion is {len(completion)} tokens, over max-length {max_length}; "
                    "shorten it or raise max-length",
                    line=example.line or None,
                    field="completion",
                )
            raise DataError(
                where,
                f"prompt is {len(prompt)} tokens (with the chat template) and leaves "
                f"{max_length - len(prompt)} of max-length {max_length} for a {len(completion)}-token "
                "completion; shorten it or raise max-length",
                line=example.line or None,
                field="prompt",
            )
        return prompt + completion, len(prompt)

    def batch(self, indices: Sequence[int]) -> Batch:
        rows = [self.rows[i] for i in indices]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(rows), width), pad, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, (ids, n_prompt) in enumerate(rows):
            input_ids[r, : len(ids)] = ids
            labels[r, n_prompt : len(ids)] = ids[n_prompt:]
            mask[r, : len(ids)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
        }


Encoder = ClassificationEncoder | CompletionEncoder


def make_encoder(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ClassificationExample] | Sequence[CompletionExample],
    max_length: int,
    system_prompt: str = "",
) -> Encoder:
    """The encoder that fits the examples' task (`system_prompt`: causal-LM chat turns)."""
    if examples and isinstance(examples[0], CompletionExample):
        return CompletionEncoder(tokenizer, examples, max_length, system_prompt)  # type: ignore[arg-type]
    return ClassificationEncoder(tokenizer, examples, max_length)  # type: ignore[arg-type]


def batch_indices(n: int, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[list[int]]:
    """Index batches over n items: shuffled with `rng`, in order without."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size].tolist()


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator, mega: int = 50
) -> Iterator[list[int]]:
    """Shuffled batches of similar length (as transformers' `group_by_length`): shuffle,
    sort within mega-batches of `mega` batches, then shuffle the batch order. Every
    index appears once per pass; padding, and so compute, shrinks."""
    order = rng.permutation(len(lengths))
    size = mega * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size].tolist(), key=lambda i: -lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    for b in rng.permutation(len(batches)):
        yield batches[b]


def example_lengths(encoder: "Encoder") -> list[int]:
    """Token count of every encoded example."""
    if isinstance(encoder, ClassificationEncoder):
        return [len(ids) for ids in encoder.encoded["input_ids"]]
    return [len(ids) for ids, _ in encoder.rows]
