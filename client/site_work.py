"""One run's work at one site, without Flower: the census answer, a round of local
training and a local evaluation, each from the global adapter's arrays. The in-process
ClientApp (simulation) and the long-lived site worker (deployment) both call it; it
caches the site's data and tokenised examples for the run, and the base model per process
(`model_cache.py`)."""

from __future__ import annotations

import json
import logging
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from peft import PeftModel

from fedtune.accelerator import pick_device
from fedtune.adapter_io import get_adapter_arrays, set_adapter_arrays
from fedtune.config import RunSettings
from fedtune.encoding import Encoder, make_encoder
from fedtune.errors import FedtuneError
from fedtune.evaluation import evaluate
from fedtune.gate_request import GateRequest
from fedtune.memory_plan import (
    MemoryPlan,
    MemoryPlanError,
    check_fits,
    free_memory,
    gib,
    model_shape,
    resolve_checkpointing,
)
from fedtune.precision import BasePrecision, resolve_precision
from fedtune.run_budget import read_round_plan
from fedtune.site_rank import column_weights, trained_rank, zero_untrained

from .dp_history import HistoryStore, history_file
from .model_cache import cached_lora_model, cached_tokenizer, held_model_bytes
from .node_settings import NodeSettings
from .optimizer_state import MemoryOptimizerStore, OptimizerStore
from .privacy_floor import PrivacyFloor
from .secagg_setup import setup_from_config
from .site_curves import NoCurves, SiteCurves, curves_folder
from .site_data import SiteData, load_site_data
from .site_ranks import RankGroup, RankShard, rank_device
from .trainer import TrainResult, train_local
from .worker_protocol import Scalar

log = logging.getLogger("fedtune.site")

Config = Mapping[str, Scalar]
_PLANS_LOGGED: set[tuple[object, ...]] = set()


class SiteWork:
    """A site's part in one run: its settings, its data, its DP accountant store and where it
    keeps its optimizer moments (`keep-optimizer-state`)."""

    def __init__(
        self,
        settings: RunSettings,
        node: NodeSettings,
        history: HistoryStore,
        optimizer_store: OptimizerStore | None = None,
        ranks: RankGroup | RankShard | None = None,
    ) -> None:
        """`ranks`: the site's rank group (rank 0, the worker) or this process's shard (ranks 1..N-1)."""
        if ranks is not None and settings.dp:
            raise FedtuneError("DP training runs on one device per site: start the site without --devices")
        self.settings = settings
        self.ranks = ranks
        self.shard = ranks.shard if isinstance(ranks, RankGroup) else ranks
        self.device = rank_device(self.shard.rank) if self.shard is not None else pick_device()
        self.lora = settings.lora_settings()  # what the model trains and what travels
        self.node = node
        self.history = history
        self.optimizer_store = optimizer_store or MemoryOptimizerStore()
        self.floor = node.floor or PrivacyFloor()
        self._site: tuple[tuple[str, ...], SiteData] | None = None
        self._encoders: dict[tuple[str, int], Encoder] = {}
        self._plan: tuple[BasePrecision, MemoryPlan] | None = None

    def site_name(self) -> str:
        return self.node.name

    def labels(self, config: Config) -> tuple[str, ...]:
        if "labels" in config:
            return tuple(json.loads(str(config["labels"])))
        return tuple(self.settings.label_list())

    def model(self, labels: Sequence[str]) -> PeftModel:
        s = self.settings
        precision, _ = self.plan(labels)  # refuses a step this device cannot hold, before the weights load
        return cached_lora_model(s.base_model, s.task, self.lora, tuple(labels), s.seed, precision, self.device)

    def plan(self, labels: Sequence[str]) -> tuple[BasePrecision, MemoryPlan]:
        """The base's precision on this site's device and the training step's memory plan,
        resolved once per run; a MemoryPlanError (one line) when the device cannot hold it."""
        if self._plan is None:
            s = self.settings
            device = self.device
            precision = resolve_precision(s.base_dtype, s.quantize_base, False, device)
            shape = model_shape(s.base_model, s.task, s, labels)
            budget = free_memory(device) + held_model_bytes(device)  # a model this process holds is reused or replaced
            checkpointing = resolve_checkpointing(s.gradient_checkpointing, shape, s, precision, budget)
            precision = replace(precision, checkpointing=checkpointing)
            name = self.site(labels).name
            try:
                plan = check_fits(shape, s, precision, device, budget)
            except MemoryPlanError as err:
                raise MemoryPlanError(f"site {name}: {err}") from None
            said = (name, precision, device)
            if said not in _PLANS_LOGGED:  # once per process, not every round's message
                _PLANS_LOGGED.add(said)
                # a real site says what it loads; virtual sites on one machine keep the demo's output as it was
                level = logging.DEBUG if self.node.mode == "simulated" else logging.INFO
                log.log(level, "%s: %s on %s, memory plan %s", name, precision.describe(), device, gib(plan.total))
            self._plan = (precision, plan)
        return self._plan

    def site(self, labels: Sequence[str]) -> SiteData:
        """The site's examples, read and split once per run (and label set)."""
        key = tuple(labels)
        if self._site is None or self._site[0] != key:
            self._site = (key, load_site_data(self.settings, self.node, labels))
            self._encoders.clear()
        return self._site[1]

    def encoder(self, split: str, examples: Sequence[Any]) -> Encoder:
        """The examples tokenised for this run, once per split (a pair over max-length is a DataError)."""
        key = (split, len(examples))
        if key not in self._encoders:
            s = self.settings
            self._encoders[key] = make_encoder(cached_tokenizer(s.base_model), examples, s.max_length, s.system_prompt)
        return self._encoders[key]

    def properties(self, config: Config) -> dict[str, Scalar]:
        """Answers the SecAgg+ census: the site's training-example count only, once the
        run passes its privacy floor and its memory plan fits this site's device."""
        labels = self.labels(config)
        site = self.site(labels)
        self.floor.check_run(self.settings, site.name)
        self.node.trained_rank(self.settings)  # a rank above the federation's is refused here, before round 1
        self.plan(labels)
        return {"site": site.name, "num_examples": len(site.train)}

    def fit(self, parameters: list[np.ndarray], config: Config) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        request = GateRequest.from_config(config)
        if request is not None:
            return self.score_candidate(parameters, config, request)
        labels = self.labels(config)
        site = self.site(labels)
        s = self.settings
        self.floor.check_run(s, site.name)  # before the model is touched
        plan = read_round_plan(config, s.batch_size)  # train-epochs: this round's steps and batch, bounded
        if plan and not s.dp:
            s = replace(s, local_steps=plan["local-steps"], batch_size=plan["batch-size"])
        rank = self.node.trained_rank(s)
        model = self.model(labels)
        set_adapter_arrays(model, parameters, self.lora)
        server_round = int(config.get("server-round", 1))
        num_rounds = int(config.get("num-rounds", s.num_rounds))
        encoder = self.encoder("train", site.train)
        seed = s.seed + 7919 * server_round + zlib.crc32(site.name.encode())
        dp_metrics: dict[str, Scalar] = {}
        curves = self.curves(config, site.name)
        curves.start_round(server_round)
        if isinstance(self.ranks, RankGroup):  # the site's other ranks train this round with this process
            self.ranks.start_fit(s.to_run_config(), self.node.to_node_config(), parameters, config)
        if s.dp:
            result, dp_metrics = self._fit_dp(model, encoder, config, site.name, server_round, num_rounds)
        else:
            with trained_rank(model, rank, s.lora_r):  # a lower rank: the first `rank` components
                result = train_local(
                    model,
                    encoder,
                    s,
                    server_round=server_round,
                    num_rounds=num_rounds,
                    site=site.name,
                    proximal_mu=float(config.get("proximal_mu", 0.0)),
                    seed=seed,
                    optimizer_store=self.optimizer_store if s.keeps_optimizer_state else None,
                    shard=self.shard,
                    on_step=curves.train_step,
                )
        if s.hetero_ranks:
            zero_untrained(model, rank)  # the sum over sites holds only what each trained
        arrays = get_adapter_arrays(model, self.lora)
        if s.hetero_ranks:
            arrays.append(column_weights(rank, s.lora_r))  # which columns of B this site trained
        metrics: dict[str, Scalar] = {
            "site": site.name,
            "train_loss": result.loss,
            "train_loss_first": result.first_loss,
            "train_loss_last": result.last_loss,
            "num_examples": result.num_examples,
            "steps": result.steps,
            **dp_metrics,
        }
        if s.secagg:
            # SecAgg+ clips values beyond +-C; say how many, since the sum cannot show it.
            limit = s.secagg_clipping_range
            metrics["secagg_clipped_values"] = int(sum(int((np.abs(a) > limit).sum()) for a in arrays))
        curves.end_round(server_round, {k: v for k, v in metrics.items() if k != "secagg_clipped_values"})
        return arrays, result.num_examples, metrics

    def curves(self, config: Config, site: str) -> SiteCurves:
        """This site's own TensorBoard curves of the run the message names (kept at the site);
        with several ranks, rank 0 writes them."""
        if self.shard is not None and self.shard.rank != 0:
            return NoCurves()
        return SiteCurves(curves_folder(self.node.state_folder(self.settings), config.get("run-id", "run"), site))

    def score_candidate(
        self, parameters: list[np.ndarray], config: Config, request: GateRequest
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """A gate round: the release candidate and the final round's PyTorch model on this
        site's validation split (a causal LM's: its first `eval-max-examples`), as one vector
        of fractions (`client/release_gate.py`)."""
        from fedtune.edge_device.generative import GenerativeModel
        from fedtune.edge_device.runtime import EdgeModel

        from .release_gate import SiteTrust, pull_candidate, score_classifier, score_completions, site_drop_pt

        labels = self.labels(config)
        site = self.site(labels)
        s = self.settings
        self.floor.check_run(s, site.name)
        trust = SiteTrust.of(self.node, s)
        model = self.model(labels)
        set_adapter_arrays(model, parameters, self.lora)
        examples = site.val or site.train
        if s.task == "causal-lm" and s.eval_max_examples > 0:
            examples = examples[: s.eval_max_examples]
        encoder = self.encoder("val" if site.val else "train", examples)
        folder = self.node.state_folder(s) / "gate" / site.name
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="candidate-", dir=folder) as into:  # a fresh pull every gate round
            bundle = pull_candidate(request, trust, Path(into))
            if s.task == "seq-cls":
                edge = EdgeModel.load(bundle, trust.trust_key)
                vector = score_classifier(model, encoder, examples, labels, edge)  # type: ignore[arg-type]
            else:
                with GenerativeModel(bundle, trust.trust_key) as generator:
                    vector = score_completions(
                        model,
                        cached_tokenizer(s.base_model),
                        encoder,  # type: ignore[arg-type]
                        examples,  # type: ignore[arg-type]
                        generator,
                        s.eval_max_new_tokens,
                    )
        num_labels = len(labels) if s.task == "seq-cls" else 0
        metrics: dict[str, Scalar] = {"site": site.name, "gate_examples": len(examples)}
        if self.node.reveal_gate_drop:
            metrics["gate_drop_pt"] = round(site_drop_pt(vector, num_labels), 4)
        log.info(
            "%s: scored release candidate %s %s on %d examples",
            site.name,
            request.model,
            request.version,
            len(examples),
        )
        return [vector], len(examples), metrics

    def _fit_dp(
        self, model: PeftModel, encoder: Encoder, config: Config, site: str, server_round: int, num_rounds: int
    ) -> tuple[TrainResult, dict[str, Scalar]]:
        """One DP round, per-site (`dp_trainer.py`) or distributed (`distributed_dp.py`): the
        accountant's history from the site's store, the site's ceiling checked before any
        privacy is spent, the history saved after."""
        from . import distributed_dp, dp_trainer  # Opacus only when used
        from .head_features import cached_head_features
        from .trainer import absent_label_mask

        s = self.settings
        distributed = s.dp_mode == "distributed"
        threshold = distributed_dp.checked_threshold(setup_from_config(config), site) if distributed else 0
        state = history_file(self.node, s, str(config.get("run-id", "run")), site)
        spent = self.history.load(state)
        if self.floor.max_epsilon > 0:
            if distributed:
                own = threshold if self.floor.own_noise_only else 0
                now, after = distributed_dp.epsilon_after_round(s, num_rounds, spent, own)
            else:
                now, after = dp_trainer.epsilon_after_round(s, len(encoder), num_rounds, spent)
            self.floor.check_round(after, now, server_round, site)
        features = cached_head_features(model, encoder, site) if s.head_only else None
        extra: dict[str, Scalar] = {}
        if distributed:
            assert features is not None  # config: distributed DP is head-only
            mask = absent_label_mask(model, encoder, next(model.parameters()).device) if s.restricted_softmax else None
            result, history, report, _ = distributed_dp.train_head_distributed_dp(
                model, *features, s, server_round, num_rounds, threshold, spent, mask, site
            )
            extra = {
                "dp_noise_shares": threshold,
                "dp_epsilon_own_noise": distributed_dp.own_noise_epsilon(s, history, threshold),
            }
        else:
            result, history, report = dp_trainer.train_local_dp(
                model, encoder, s, server_round, num_rounds, spent, site=site, features=features
            )
        self.history.save(state, history)
        return result, {**report.metrics(), **extra}

    def evaluate(self, parameters: list[np.ndarray], config: Config) -> tuple[float, int, dict[str, Scalar]]:
        labels = self.labels(config)
        site = self.site(labels)
        s = self.settings
        self.floor.check_run(s, site.name)  # a run refused for training is refused for evaluation too
        model = self.model(labels)
        set_adapter_arrays(model, parameters, self.lora)
        examples = site.val or site.train
        encoder = self.encoder("val" if site.val else "train", examples)
        metrics = evaluate(model, encoder, max_new_tokens=s.eval_max_new_tokens, max_generated=s.site_val_generated)
        out: dict[str, Scalar] = {"site": site.name, "num_examples": len(examples)}
        out.update({f"val_{k}": float(v) for k, v in metrics.items()})
        self.curves(config, site.name).validation(int(config.get("server-round", 0)), metrics)
        return float(metrics["loss"]), len(examples), out
