"""Tiny random-weight models built from a config (no download): a 2-layer BERT and a
2-layer Llama, both with the embedded MiniLM tokenizer. The tests' fixtures and the
deployment benchmark build them here."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _minilm_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from fedtune.model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("default"))


def save_tiny_bert(out: Path, dropout: float = 0.1) -> Path:
    """A 2-layer BERT with random weights (seed 0) and the MiniLM tokenizer, saved to `out`."""
    import torch
    from transformers import BertConfig, BertModel

    tok = _minilm_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def save_tiny_llama(out: Path) -> Path:
    """A 2-layer Llama with random weights (seed 0); the MiniLM tokenizer plus a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _minilm_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
