"""A site as a Flower NumPyClient: receive the global adapter, train or evaluate
locally, and reply with adapter tensors and aggregate metrics only."""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from typing import Any, Iterator, Sequence

import numpy as np
from flwr.client import NumPyClient
from flwr.common import Context
from peft import PeftModel

from fedtune.adapter_io import get_adapter_arrays, set_adapter_arrays
from fedtune.config import RunSettings
from fedtune.encoding import Encoder, make_encoder
from fedtune.errors import FedtuneError
from fedtune.evaluation import evaluate

from .model_cache import cached_lora_model, cached_tokenizer
from .site_data import SiteData, load_site_data
from .trainer import train_local

log = logging.getLogger("fedtune.site")

Scalar = bool | bytes | float | int | str


@contextlib.contextmanager
def errors_logged() -> Iterator[None]:
    """Log a FedtuneError as one line for the site operator, then let it fail the message."""
    try:
        yield
    except FedtuneError as err:
        log.error("fedtune: error: %s", err)
        raise


class SiteClient(NumPyClient):
    """Trains the run's LoRA adapter on one site's private examples."""

    def __init__(self, settings: RunSettings, context: Context) -> None:
        self.settings = settings
        self.context = context
        self.node_config = dict(context.node_config)

    def _labels(self, config: dict[str, Scalar]) -> list[str]:
        if "labels" in config:
            return list(json.loads(str(config["labels"])))
        return self.settings.label_list()

    def _model(self, labels: Sequence[str]) -> PeftModel:
        s = self.settings
        return cached_lora_model(s.base_model, s.task, s.lora_settings(), tuple(labels), s.seed)

    def _site(self, labels: Sequence[str]) -> SiteData:
        with errors_logged():
            return load_site_data(self.settings, self.node_config, labels)

    def _encoder(self, examples: Sequence[Any]) -> Encoder:
        """The examples tokenised for this run (a pair over max-length is a DataError)."""
        s = self.settings
        with errors_logged():
            return make_encoder(cached_tokenizer(s.base_model), examples, s.max_length, s.system_prompt)

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        return get_adapter_arrays(self._model(self._labels(config)), self.settings.ffa_lora)

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Answers the SecAgg+ census: the site's training-example count only."""
        site = self._site(self._labels(config))
        return {"site": site.name, "num_examples": len(site.train)}

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        labels = self._labels(config)
        site = self._site(labels)
        model = self._model(labels)
        set_adapter_arrays(model, parameters, self.settings.ffa_lora)
        server_round = int(config.get("server-round", 1))
        num_rounds = int(config.get("num-rounds", self.settings.num_rounds))
        encoder = self._encoder(site.train)
        seed = self.settings.seed + 7919 * server_round + zlib.crc32(site.name.encode())
        dp_metrics: dict[str, Scalar] = {}
        if self.settings.dp:
            from .dp_trainer import (  # Opacus only when used
                history_file,
                load_history,
                save_history,
                train_local_dp,
            )

            state = history_file(self.context, self.settings, str(config.get("run-id", "run")), site.name)
            result, history, report = train_local_dp(model, encoder, self.settings, server_round, num_rounds,
                                                     load_history(self.context, state), site=site.name, seed=seed)
            save_history(self.context, state, history)
            dp_metrics = {"dp_epsilon": report.epsilon, "dp_epsilon_next": report.epsilon_next_round,
                          "dp_noise_multiplier": report.noise_multiplier, "dp_sample_rate": report.sample_rate}
        else:
            result = train_local(
                model,
                encoder,
                self.settings,
                server_round=server_round,
                num_rounds=num_rounds,
                site=site.name,
                proximal_mu=float(config.get("proximal_mu", 0.0)),
                seed=seed,
            )
        arrays = get_adapter_arrays(model, self.settings.ffa_lora)
        metrics: dict[str, Scalar] = {
            "site": site.name,
            "train_loss": result.loss,
            "train_loss_first": result.first_loss,
            "train_loss_last": result.last_loss,
            "num_examples": result.num_examples,
            "steps": result.steps,
            **dp_metrics,
        }
        if self.settings.secagg:
            # SecAgg+ clips values beyond +-C; say how many, since the sum cannot show it.
            limit = self.settings.secagg_clipping_range
            metrics["secagg_clipped_values"] = int(sum(int((np.abs(a) > limit).sum()) for a in arrays))
        return arrays, result.num_examples, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        labels = self._labels(config)
        site = self._site(labels)
        model = self._model(labels)
        set_adapter_arrays(model, parameters, self.settings.ffa_lora)
        examples = site.val or site.train
        s = self.settings
        encoder = self._encoder(examples)
        metrics = evaluate(model, encoder, max_new_tokens=s.eval_max_new_tokens, max_generated=s.eval_max_examples)
        out: dict[str, Scalar] = {"site": site.name, "num_examples": len(examples)}
        out.update({f"val_{k}": float(v) for k, v in metrics.items()})
        return float(metrics["loss"]), len(examples), out
