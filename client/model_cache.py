"""One LoRA model per process, reused across rounds: a simulation actor or a site
worker serves many rounds, and every fit overwrites all trainable tensors with the
global adapter. `model_loads()` counts how often this process built one."""

from __future__ import annotations

import functools

from peft import PeftModel

from fedtune.accelerator import pick_device
from fedtune.model import LoraSettings, build_lora_model, load_tokenizer

_loads = 0


@functools.lru_cache(maxsize=1)
def cached_lora_model(model: str, task: str, lora: LoraSettings, labels: tuple[str, ...], seed: int) -> PeftModel:
    """The LoRA-wrapped base model on this process's device."""
    global _loads
    _loads += 1
    return build_lora_model(model, task, lora, labels, seed).to(pick_device())


def model_loads() -> int:
    """How many base models this process has loaded."""
    return _loads


@functools.lru_cache(maxsize=2)
def cached_tokenizer(model: str):  # type: ignore[no-untyped-def]
    """The base model's tokenizer."""
    return load_tokenizer(model)
