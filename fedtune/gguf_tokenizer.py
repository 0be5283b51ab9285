"""A Hugging Face fast tokenizer built from a GGUF file's own vocabulary, merges and
special tokens, for GGUF models whose tokenizer is GPT-2 byte-level BPE (`gpt2`).

transformers' GGUF converter gets SmolLM2 wrong in three ways: it prepends a BOS the
file says not to add (`tokenizer.ggml.add_bos_token = false`), it chains a SentencePiece
decoder (`ByteFallback`, `Replace("▁")`) in front of the byte-level one, and it leaves the
EOS as `<|im_start|>` and most control tokens unregistered as special. Built here from
the GGUF fields instead, the saved `tokenizer.json` round-trips text with the
`tokenizers` library alone (no `Ġ`/`Ċ` in decoded text) and the chat markers are single
special ids, as in the original Hugging Face release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError

# llama.cpp's pre-tokeniser types that split digits one by one before GPT-2's regex
# (`\p{N}` then the GPT-2 pattern; llama.cpp src/llama-vocab.cpp, STARCODER/SMOLLM/...).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_GGUF_CONTROL = 3  # llama.cpp token type: control (special) token


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def build_tokenizer(gguf_path: Path) -> Any:
    """A `PreTrainedTokenizerFast` equal in ids to the model's original tokenizer."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(gguf_path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(
            "model", f"{gguf_path.name}: tokenizer type {kind!r} is not supported (only gpt2 byte-level BPE)"
        )
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    backend = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)), use_regex=True
    )
    if _field(reader, "tokenizer.ggml.pre", "") in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types) if kind == _GGUF_CONTROL]

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    if bool(_field(reader, "tokenizer.ggml.add_bos_token", False)):
        raise ConfigError("model", f"{gguf_path.name}: GGUF tokenizers that add a BOS are not supported")
    eos = token("eos")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding") or eos,
        additional_special_tokens=[t for t in specials if t not in {token("bos"), eos, token("unknown")}],
        chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
