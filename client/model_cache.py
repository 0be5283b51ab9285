"""One LoRA model per process, reused across rounds: a simulation actor or a site
worker serves many rounds, and every fit overwrites all trainable tensors with the
global adapter. `model_loads()` counts how often this process built one."""

from __future__ import annotations

import functools

import torch
from peft import PeftModel

from fedtune.model import LoraSettings, build_lora_model, load_tokenizer
from fedtune.precision import BasePrecision

_loads = 0
_held: tuple[tuple[object, ...], PeftModel] | None = None  # (the arguments it was built from, the model)


def cached_lora_model(
    model: str,
    task: str,
    lora: LoraSettings,
    labels: tuple[str, ...],
    seed: int,
    precision: BasePrecision,
    device: torch.device,
) -> PeftModel:
    """The LoRA-wrapped base model, its base in `precision`, loaded straight onto `device`;
    the one this process holds when the arguments match, else the held one is dropped first
    (two bases never share the device)."""
    global _loads, _held
    key = (model, task, lora, labels, seed, precision, device)
    if _held is not None and _held[0] == key:
        return _held[1]
    _held = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _loads += 1
    built = build_lora_model(model, task, lora, labels, seed, precision, device)
    _held = (key, built)
    return built


def held_model() -> PeftModel | None:
    """The model this process holds, if any."""
    return _held[1] if _held is not None else None


def held_model_bytes(device: torch.device) -> int:
    """Bytes of the model this process holds on `device`'s kind (0 when none). It is reused
    or dropped before the next one loads, so a memory plan counts it as available."""
    if _held is None:
        return 0
    tensors = (*_held[1].parameters(), *_held[1].buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)


def model_loads() -> int:
    """How many base models this process has loaded."""
    return _loads


@functools.lru_cache(maxsize=2)
def cached_tokenizer(model: str):  # type: ignore[no-untyped-def]
    """The base model's tokenizer."""
    return load_tokenizer(model)
