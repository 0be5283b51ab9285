"""What the coordinator checks before round 1, so that a wrong setting fails at the start
with one line instead of after the last round: the run folder (new, or resumable), the
label set, the held-out file against that label set and the task's fields, the data set
(simulation only: deployed sites check their own), the model, and the SecAgg+ ranges.
The settings' own values (strategy, privacy) are checked by `RunSettings.validate`.
Used by the launchers (`fedtune simulate`, `fedtune deploy run`) and by the ServerApp.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedtune.config import RunSettings, resolve_path
from fedtune.errors import ConfigError, FedtuneError
from fedtune.run_folder import METRICS_FILE, RUN_FILE, read_rounds

from .privacy_budget import resume_refusal


def check_run_inputs(settings: RunSettings, data_set: bool = False, num_sites: int | None = None) -> None:
    """Raise FedtuneError (one line) for the first input that would fail the run. Reads the
    held-out file (and, with `data_set`, the simulation's data set); writes nothing."""
    check_run_folder(settings)
    labels = settings.label_list()
    from fedtune.data import load_examples

    if data_set:
        _require_file("data-path", settings.data_path)
        load_examples(settings.data_path, settings, labels)
    if settings.central_eval_path:
        _require_file("central-eval-path", settings.central_eval_path)
        load_examples(settings.central_eval_path, settings, labels)
    check_model(settings)
    if settings.tracking == "mlflow" and settings.tracking_uri:
        from .mlflow_tracker import check_tracking_uri

        check_tracking_uri(settings.tracking_uri)
    settings.check_for_sites(max(num_sites or 0, settings.min_sites), exact=num_sites is not None)


def check_run_folder(settings: RunSettings) -> Path:
    """The run folder must be new, or (with `resume`) hold a run the budget did not stop."""
    run_path = Path(settings.output_dir).expanduser().resolve() / (settings.run_name or "-")
    if settings.gate_registry:  # a gate round scores a finished run's final adapter
        if not (run_path / "final").is_dir():
            raise FedtuneError(f"gate: {run_path} holds no finished run (no final adapter)")
        return run_path
    if settings.resume:
        if not (run_path / RUN_FILE).exists():
            raise FedtuneError(f"cannot resume: {run_path} holds no run ({RUN_FILE} missing)")
        refusal = resume_refusal(run_path, read_rounds(run_path), settings.dp, settings.dp_epsilon_budget)
        if refusal:
            raise FedtuneError(refusal)
    elif settings.run_name and (run_path / METRICS_FILE).exists():
        raise FedtuneError(
            f"run folder {run_path} already holds a run; choose another run-name (--run-name), or "
            f"continue it (--resume)"
        )
    check_writable(run_path.parent)
    return run_path


def check_writable(folder: Path) -> None:
    """output-dir can be created and written to: a probe file (and any folder made for it)
    is removed at once, so a refused run leaves nothing behind."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedtune-probe-"):
            pass
    except OSError as err:
        raise FedtuneError(f"output-dir {folder}: cannot write there ({err.strerror or err})") from None
    finally:
        for path in made:  # deepest first
            try:
                path.rmdir()
            except OSError:
                pass


def check_model(settings: RunSettings) -> None:
    """A model other than an embedded one must be a local folder or a Hugging Face id in the
    local cache (nothing is downloaded at run time)."""
    from fedtune.model import resolve_model_path

    model = settings.base_model
    path = resolve_model_path(model)
    if path != model:  # embedded: ships with fedtune
        return
    if Path(path).expanduser().exists():
        if not (Path(path).expanduser() / "config.json").is_file():
            raise ConfigError("model", f"{path}: no config.json; not a Hugging Face model folder")
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # a malformed id
        cached = None
    if not isinstance(cached, str):
        raise ConfigError(
            "model",
            f"{model!r} is neither a local folder nor a Hugging Face id in the local cache "
            f"(runs are offline: download it first, or pass a folder)",
        )


def _require_file(key: str, path: str) -> None:
    if not resolve_path(path).is_file():
        raise ConfigError(key, f"{path}: file not found")
