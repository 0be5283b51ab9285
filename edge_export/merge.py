"""Merge a run's global LoRA adapter into its base model (fp32) and save it, with the
tokenizer, as a plain transformers folder that optimum can export."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.adapter_io import load_adapter_model, read_metadata
from fedtune.model import load_tokenizer, resolve_model_path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load base + adapter, merge the LoRA deltas (the head comes along), save fp32."""
    meta = read_metadata(adapter_dir)
    peft_model = load_adapter_model(adapter_dir)
    merged = peft_model.merge_and_unload().to(torch.float32).eval()
    tokenizer = load_tokenizer(meta["base_model"])
    if merged.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return merged, tokenizer


def base_model_hash(model: str) -> str:
    """sha256 over the base model's weight files (name and bytes, sorted by name)."""
    path = Path(resolve_model_path(model))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(model), local_files_only=True))
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
