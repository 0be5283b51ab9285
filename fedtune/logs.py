"""Console logging for fedtune's own progress lines (sites and coordinator)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Give the 'fedtune' logger one stdout handler (idempotent)."""
    logger = logging.getLogger("fedtune")
    logger.setLevel(level)
    if not any(getattr(h, "_fedtune", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s fedtune %(message)s", "%H:%M:%S"))
        handler._fedtune = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    return logger
