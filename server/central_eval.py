"""Optional central evaluation of the global adapter on a held-out file the
coordinator owns (never site data)."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
from flwr.common import NDArrays, Scalar
from peft import PeftModel

from fedtune.adapter_io import set_adapter_arrays
from fedtune.config import RunSettings
from fedtune.data import load_examples
from fedtune.encoding import Encoder, make_encoder
from fedtune.evaluation import evaluate
from fedtune.model import load_tokenizer

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


def make_central_evaluator(
    settings: RunSettings, model: PeftModel, labels: Sequence[str], should_run: Callable[[int], bool]
) -> EvaluateFn | None:
    """A Flower `evaluate_fn` on `central-eval-path`, or None when none is set."""
    if not settings.central_eval_path:
        return None

    @functools.lru_cache(maxsize=1)
    def encoder() -> Encoder:
        examples = load_examples(settings.central_eval_path, settings, labels)
        return make_encoder(load_tokenizer(settings.base_model), examples, settings.max_length, settings.system_prompt)

    def evaluate_fn(
        server_round: int, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if not should_run(server_round):
            return None
        set_adapter_arrays(model, [np.asarray(p) for p in parameters], settings.lora_settings())
        metrics = evaluate(
            model, encoder(), max_new_tokens=settings.eval_max_new_tokens, max_generated=settings.eval_max_examples
        )
        return float(metrics["loss"]), {k: float(v) for k, v in metrics.items()}

    return evaluate_fn
