"""The run-config keys most federation tests share: the tiny BERT on the sentiment task."""

from __future__ import annotations

from pathlib import Path


def sentiment_config(tiny_bert_dir: Path, sentiment_data: dict[str, Path]) -> dict[str, object]:
    """Model, training data, labels and held-out file of the tiny-BERT sentiment runs."""
    return {
        "model": str(tiny_bert_dir),
        "data-path": str(sentiment_data["train"]),
        "labels-file": str(sentiment_data["labels"]),
        "central-eval-path": str(sentiment_data["test"]),
    }
