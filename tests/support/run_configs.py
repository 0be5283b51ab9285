"""The run-config keys most federation tests share: the tiny BERT on the sentiment task."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sentiment_config(tiny_bert_dir: Path, sentiment_data: dict[str, Path]) -> dict[str, object]:
    """Model, training data, labels and held-out file of the tiny-BERT sentiment runs."""
    return {
        "model": str(tiny_bert_dir),
        "data-path": str(sentiment_data["train"]),
        "labels-file": str(sentiment_data["labels"]),
        "central-eval-path": str(sentiment_data["test"]),
    }


def completion_site_config(tiny_llama_dir: Path, completion_data: dict[str, Path], **run: Any) -> dict[str, Any]:
    """A causal-LM run config for one site of the tiny Llama: every default, two IID sites' worth."""
    from fedtune.config import default_run_config

    return {
        **default_run_config(),
        "task": "causal-lm",
        "model": str(tiny_llama_dir),
        "data-path": str(completion_data["train"]),
        "central-eval-path": "",
        "partitioning": "iid",
        "batch-size": 8,
        "val-fraction": 0.2,
        "secagg": False,
        "lora-target-modules": "",
        **run,
    }


def site_context(config: dict[str, Any]) -> Any:
    """The Flower context a ClientApp gets for partition 0 of 2, with empty state."""
    from flwr.app import Context, RecordDict

    return Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config=config
    )
