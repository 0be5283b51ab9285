"""Run settings: the typed view of Flower's flat run config (`[tool.flwr.app.config]`)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import tomllib

from fedtune.errors import ConfigError

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
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a folder name under output-dir, never a path


# Project root: relative data paths in the run config resolve against it when they
# do not exist relative to the working directory (Flower installs apps elsewhere).
APP_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a federated run; field names map to dashed config keys."""

    model: str = "default"
    task: str = "seq-cls"
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    system_prompt: str = ""
    eval_max_new_tokens: int = 16
    eval_max_examples: int = 0
    labels: str = ""
    labels_file: str = ""
    max_length: int = 64
    data_path: str = ""
    partitioning: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.1
    seed: int = 42
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = ""
    lora_top_layers: int = 0
    ffa_lora: bool = False
    ffa_head_rank: int = 0
    head_init: str = "auto"
    head_input: str = "auto"
    local_epochs: float = 1.0
    local_steps: int = 0
    min_local_steps: int = 0
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    lr_schedule: str = "linear"
    restricted_softmax: bool = True
    group_by_length: bool = True
    keep_optimizer_state: bool = False
    num_rounds: int = 5
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    fedopt_eta: float = 0.01
    fedopt_tau: float = 0.001
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    dp: bool = False
    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    dp_batch_size: int = 0
    dp_learning_rate: float = 0.0
    dp_local_epochs: float = 0.0
    dp_head_only: bool = False
    dp_mode: str = "local"
    dp_sample_rate: float = 0.2
    dp_accountant: str = "rdp"
    dp_epsilon_budget: float = 0.0
    secagg: bool = True
    secagg_clipping_range: float = 4.0
    secagg_quantization_range: int = 4194304
    secagg_modulus_range: int = 4294967296
    secagg_max_weight: float = 0.0
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_timeout: float = 600.0
    central_eval_path: str = ""
    central_eval_every: int = 0
    output_dir: str = "runs"
    run_name: str = ""
    resume: bool = False
    site_state_dir: str = ".fedtune-site-state"
    site_worker_socket: str = ""  # simulation: every virtual site's work goes to this site worker

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
        """Raise ConfigError naming the first bad key."""
        _choice("task", self.task, TASKS)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("partitioning", self.partitioning, PARTITIONINGS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("head-init", self.head_init, HEAD_INITS)
        _choice("head-input", self.head_input, HEAD_INPUTS)
        _choice("dp-mode", self.dp_mode, DP_MODES)
        _choice("dp-accountant", self.dp_accountant, DP_ACCOUNTANTS)
        for key, value in (
            ("lora-r", self.lora_r),
            ("batch-size", self.batch_size),
            ("num-rounds", self.num_rounds),
            ("max-length", self.max_length),
            ("min-sites", self.min_sites),
            ("eval-max-new-tokens", self.eval_max_new_tokens),
        ):
            if value < 1:
                raise ConfigError(key, f"must be at least 1, got {value}")
        if self.lora_top_layers < 0:
            raise ConfigError("lora-top-layers", f"must be 0 (every layer) or a count, got {self.lora_top_layers}")
        if self.ffa_head_rank < 0:
            raise ConfigError("ffa-head-rank", f"must be 0 (full head) or a rank >= 1, got {self.ffa_head_rank}")
        if self.head_only and self.ffa_head_rank:
            raise ConfigError("dp-head-only", "trains the full head: set ffa-head-rank = 0 or dp-head-only = false")
        if self.ffa_head_rank and self.head_init == "label-names":
            raise ConfigError("head-init", "'label-names' needs the full head: set ffa-head-rank = 0 or head-init = \"random\"")
        if self.ffa_head_rank and not (self.ffa_lora and self.task == "seq-cls"):
            raise ConfigError("ffa-head-rank", "applies to seq-cls runs with ffa-lora = true")
        if self.eval_max_examples < 0:
            raise ConfigError("eval-max-examples", f"must be 0 (all) or a count, got {self.eval_max_examples}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val-fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.dirichlet_alpha <= 0:
            raise ConfigError("dirichlet-alpha", f"must be > 0, got {self.dirichlet_alpha}")
        if self.run_name and not RUN_NAME.match(self.run_name):
            raise ConfigError("run-name", f"names a folder under output-dir: use 1-128 letters, digits, '.', '_' or "
                              f"'-', starting with a letter or digit (no '/'), got {self.run_name!r}")
        if self.resume and not self.run_name:
            raise ConfigError("resume", "needs run-name: the run folder to continue")
        if self.min_local_steps < 0:
            raise ConfigError("min-local-steps", f"must be 0 (no floor) or a count, got {self.min_local_steps}")
        if self.local_steps <= 0 and self.local_epochs <= 0:
            raise ConfigError("local-epochs", "must be > 0 when local-steps is 0")
        if self.keep_optimizer_state and self.dp:
            raise ConfigError("keep-optimizer-state", "applies to plain training only (DP-SGD's optimizer restarts "
                              "every round): set keep-optimizer-state = false or dp = false")
        if self.dp_batch_size < 0:
            raise ConfigError("dp-batch-size", f"must be 0 (use batch-size) or at least 1, got {self.dp_batch_size}")
        if self.dp_local_epochs < 0:
            raise ConfigError("dp-local-epochs", f"must be 0 (use local-epochs) or > 0, got {self.dp_local_epochs}")
        if self.dp_learning_rate < 0:
            raise ConfigError("dp-learning-rate", f"must be 0 (use learning-rate) or > 0, got {self.dp_learning_rate}")
        if self.learning_rate <= 0:
            raise ConfigError("learning-rate", f"must be > 0, got {self.learning_rate}")
        if not 0.0 < self.secagg_num_shares <= 1.0:
            raise ConfigError("secagg-num-shares", f"is a fraction of the sites in (0, 1], got {self.secagg_num_shares}")
        if not 0.0 < self.secagg_reconstruction_threshold <= 1.0:
            raise ConfigError(
                "secagg-reconstruction-threshold",
                f"is a fraction of the shares in (0, 1], got {self.secagg_reconstruction_threshold}",
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("fraction-train", f"must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError("fraction-evaluate", f"must be in [0, 1], got {self.fraction_evaluate}")
        self._validate_strategy()
        self._validate_privacy()
        if self.central_eval_every < 0:
            raise ConfigError("central-eval-every", f"must be 0 (last round only) or a count, got {self.central_eval_every}")
        if self.secagg_timeout <= 0:
            raise ConfigError("secagg-timeout", f"must be > 0 seconds, got {self.secagg_timeout}")

    def _validate_strategy(self) -> None:
        """The parameters of the chosen server strategy."""
        if self.strategy == "fedavgm":
            if self.server_learning_rate <= 0:
                raise ConfigError("server-learning-rate", f"must be > 0, got {self.server_learning_rate}")
            if not 0.0 <= self.server_momentum < 1.0:
                raise ConfigError("server-momentum", f"must be in [0, 1), got {self.server_momentum}")
        if self.strategy == "fedprox" and self.proximal_mu < 0:
            raise ConfigError("proximal-mu", f"must be >= 0, got {self.proximal_mu}")
        if self.strategy in ("fedadam", "fedyogi"):
            if self.fedopt_eta <= 0:
                raise ConfigError("fedopt-eta", f"must be > 0, got {self.fedopt_eta}")
            if self.fedopt_tau <= 0:
                raise ConfigError("fedopt-tau", f"must be > 0, got {self.fedopt_tau}")

    def _validate_privacy(self) -> None:
        """DP-SGD and its budget: a way to set the noise, and sane bounds."""
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError("dp-delta", f"must be in (0, 1), got {self.dp_delta}")
        for key, value in (("dp-noise-multiplier", self.dp_noise_multiplier), ("dp-target-epsilon", self.dp_target_epsilon),
                           ("dp-epsilon-budget", self.dp_epsilon_budget)):
            if value < 0:
                raise ConfigError(key, f"must be >= 0, got {value}")
        if self.dp_max_grad_norm <= 0:
            raise ConfigError("dp-max-grad-norm", f"must be > 0, got {self.dp_max_grad_norm}")
        if self.dp and self.dp_noise_multiplier == 0 and self.dp_target_epsilon == 0:
            raise ConfigError("dp", "dp = true needs dp-noise-multiplier or dp-target-epsilon (> 0)")
        if not 0.0 < self.dp_sample_rate <= 1.0:
            raise ConfigError("dp-sample-rate", f"is a Poisson sampling rate in (0, 1], got {self.dp_sample_rate}")
        if self.dp and self.dp_mode == "distributed":
            if not self.secagg:
                raise ConfigError("dp-mode", "'distributed' adds noise shares that only SecAgg+ hides: set secagg = true")
            if not self.head_only:
                raise ConfigError("dp-mode", "'distributed' trains the seq-cls head only: set task = \"seq-cls\" and "
                                             "dp-head-only = true, or dp-mode = \"local\"")

    @property
    def base_model(self) -> str:
        """The model to load: `model`, with 'default' meaning the task's embedded model
        (the MiniLM for seq-cls, SmolLM2-135M-Instruct for causal-lm)."""
        from fedtune.embedded_models import DEFAULT_MODEL, default_model

        return default_model(self.task) if self.model in ("", DEFAULT_MODEL) else self.model

    def lora_settings(self) -> "LoraSettings":
        """The LoRA part of the settings, as the model builder takes it."""
        from fedtune.model import LoraSettings

        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.target_modules()), self.ffa_lora,
                            self.ffa_head_rank, self.lora_top_layers, self.resolved_head_init(),
                            self.head_only, self.resolved_head_input())

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
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected {type_name}, got {raw!r}") from None


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}")


def project_run_config() -> dict[str, Any]:
    """Defaults from the dataclass, overlaid with `[tool.flwr.app.config]` when the
    project's pyproject.toml is at hand."""
    config = RunSettings().to_run_config()
    pyproject = APP_DIR / "pyproject.toml"
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        config.update(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))
    return config
