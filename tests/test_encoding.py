"""Causal-LM encoding: loss covers completion tokens only; the chat template is used
when the tokenizer has one."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.data import CompletionExample
from fedtune.encoding import IGNORE_INDEX, CompletionEncoder
from fedtune.errors import DataError
from fedtune.model import load_tokenizer


def test_labels_cover_completion_only_with_chat_template(tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_llama_dir))
    assert tok.chat_template
    enc = CompletionEncoder(
        tok, [CompletionExample("name a red fruit", "apple"), CompletionExample("hi", "hello there")], 64
    )
    batch = enc.batch([0, 1])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt_ids = enc.prompt_ids("name a red fruit")
    assert ids[0, : len(prompt_ids)].tolist() == prompt_ids
    assert "<|assistant|>" in tok.decode(prompt_ids).replace(" ", "") or "assistant" in tok.decode(prompt_ids)
    assert (labels[0, : len(prompt_ids)] == IGNORE_INDEX).all()
    supervised = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert "apple" in tok.decode(supervised)
    assert "red" not in tok.decode(supervised)
    assert (labels[mask == 0] == IGNORE_INDEX).all()


def test_without_chat_template_completion_follows_prompt(tiny_bert_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_bert_dir))
    assert not tok.chat_template
    enc = CompletionEncoder(tok, [CompletionExample("say yes", "yes")], 64)
    batch = enc.batch([0])
    supervised = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert tok.convert_ids_to_tokens(supervised) == ["yes", "[SEP]"]


def test_over_long_prompt_is_one_clear_line(tiny_bert_dir: Path) -> None:
    """A prompt that leaves no room for its completion is refused, naming file, line and
    field, instead of being cut silently."""
    tok = load_tokenizer(str(tiny_bert_dir))
    with pytest.raises(DataError) as err:
        CompletionEncoder(tok, [CompletionExample("word " * 100, "answer", source="site.jsonl", line=7)], 16)
    message = str(err.value)
    assert message.startswith("site.jsonl:7: field 'prompt': prompt is ") and "max-length 16" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="field 'completion'"):
        CompletionEncoder(tok, [CompletionExample("hi", "word " * 40, source="site.jsonl", line=2)], 16)
