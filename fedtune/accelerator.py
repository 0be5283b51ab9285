"""Device choice: CUDA (with bf16 autocast where supported) when present, else CPU."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def pick_device() -> torch.device:
    """CUDA when available, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device) -> ContextManager[object]:
    """bf16 autocast on CUDA GPUs that support it; a no-op elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
