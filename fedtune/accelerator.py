"""Device choice: CUDA when present, else CPU (precision: `fedtune/precision.py`)."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """CUDA when available, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
