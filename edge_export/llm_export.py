"""`fedtune export` for causal LMs, and adapter-only updates.

bundle:  merge the checkpoint's adapter (fp32) -> INT4 with onnxruntime-genai's builder
         (merged, or adapter-ready: the base in INT4 with LoRA inputs + the run's adapter file)
         -> parity gate (greedy exact match, device runtime vs PyTorch fp32) -> manifest + signature.
adapter: a later run's adapter as an `.onnx_adapter` file for an adapter-ready base bundle,
         gated the same way on that base, with a manifest that names the base's sha256.

Everything is built in a temporary folder beside the target and renamed into place only
when the gate passed and the manifest is signed, so a failed export writes nothing.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from fedtune import __version__
from fedtune.edge_device.bundle import BUNDLE_FORMAT, signed_manifest
from fedtune.edge_device.generative import GenerativeModel
from fedtune.edge_device.signature import fingerprint
from fedtune.errors import FedtuneError
from fedtune.run_folder import ADAPTER_META_FILE, FinishedRun, read_finished_run, read_json_file

from .exporter import (
    adapter_provenance,
    apply_gate,
    check_out_dir,
    held_out_file,
    move_into_place,
    parity_reference,
    seal,
)
from .signing import load_private_key

log = logging.getLogger("fedtune.export")


def checkpoint_dir(run_dir: Path, checkpoint: str) -> Path:
    folder = run_dir / checkpoint
    if "/" in checkpoint or not (folder / "adapter_model.safetensors").is_file():
        rounds = sorted(p.name for p in run_dir.glob("round-*") if p.is_dir())
        raise FedtuneError(
            f"--checkpoint: {folder} is not an adapter checkpoint of this run "
            f"(have: final{', ' + rounds[0] + ' .. ' + rounds[-1] if rounds else ''})"
        )
    return folder


def held_out_completions(
    settings: dict[str, Any], eval_path: str | Path | None, limit: int | None, run_dir: Path
) -> tuple[Path, list[Any]]:
    """The gate's prompts: the first `limit` (default: the run's eval-max-examples) held-out pairs."""
    from fedtune.data import load_completions

    eval_file = held_out_file(settings, eval_path, run_dir)
    examples = load_completions(eval_file, settings["prompt-field"], settings["completion-field"])
    if limit is None and int(settings.get("eval-max-examples") or 0) > 0:
        limit = int(settings["eval-max-examples"])
    return eval_file, examples[:limit] if limit else examples


def _public_pem(key: Any, folder: Path) -> Path:
    path = folder / "signer.pub"
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


@dataclass(frozen=True)
class RunCheckpoint:
    """What an export reads from a run folder: the run's records and one adapter checkpoint."""

    run_dir: Path
    info: FinishedRun
    ckpt: Path
    meta: dict[str, Any]

    @property
    def settings(self) -> dict[str, Any]:
        return self.info.run.settings

    @property
    def system_prompt(self) -> str:
        return str(self.meta.get("system_prompt", ""))

    @classmethod
    def open(cls, run_dir: Path, checkpoint: str) -> "RunCheckpoint":
        ckpt = checkpoint_dir(run_dir, checkpoint)
        return cls(run_dir, read_finished_run(run_dir), ckpt, read_json_file(ckpt / ADAPTER_META_FILE))


def _device_parity(
    run: RunCheckpoint,
    staging: Path,
    public_key: Path,
    model: Any,
    tokenizer: Any,
    examples: list[Any],
    threads: int | None,
    base: Path | None = None,
) -> dict[str, Any]:
    """Load the staged (provisionally signed) bundle the way a device does and gate it."""
    from . import parity

    with GenerativeModel(staging, public_key, base=base, threads=threads) as device_model:
        return parity.generation_parity(
            model,
            tokenizer,
            device_model,
            examples,
            int(run.settings["max-length"]),
            run.system_prompt,
            int(run.settings.get("eval-max-new-tokens") or 16),
        )


def export_llm_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    signing_key: str | Path,
    *,
    options: Any = None,
    adapter_ready: bool = False,
    checkpoint: str = "final",
    eval_path: str | Path | None = None,
    max_drop_pt: float = 1.0,
    force: bool = False,
    limit: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build, gate, sign and write an INT4 causal-LM bundle; returns the manifest."""
    from fedtune.model import resolve_model_path

    from . import merge
    from .exporter import federation_facts, prompt_format
    from .int4_build import Int4Options, build_int4
    from .onnx_adapter import ADAPTER_FILE, adapter_arrays, check_fits, write_adapter

    options = options or Int4Options()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_out_dir(out_dir)
    key = load_private_key(signing_key)
    run = RunCheckpoint.open(run_dir, checkpoint)
    info, ckpt, meta, settings = run.info, run.ckpt, run.meta, run.settings
    eval_file, examples = held_out_completions(settings, eval_path, limit, run_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fedtune-export-", dir=out_dir.parent))
    staging = work / "bundle"
    staging.mkdir()
    try:
        log.info("[1/4] merging %s into %s (fp32, the parity reference)", ckpt.name, meta["base_model"])
        model, tokenizer = merge.merge_adapter(ckpt, work / "merged")
        base_path = resolve_model_path(meta["base_model"])
        layout = "adapter-ready" if adapter_ready else "merged"
        log.info("[2/4] building INT4 (%s) with onnxruntime-genai's builder: %s", layout, options)
        if adapter_ready:
            quant = build_int4(Path(base_path), staging, options, work / "builder-cache", adapter_dir=ckpt)
            arrays = adapter_arrays(ckpt)
            check_fits(arrays, quant["lora_inputs"], str(ckpt))
            write_adapter(arrays, staging / ADAPTER_FILE)
        else:
            quant = build_int4(work / "merged", staging, options, work / "builder-cache")
        eos = tokenizer.eos_token_id
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "kind": "model",
            "task": "causal-lm",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fedtune_version": __version__,
            "runtime": {
                "engine": "onnxruntime-genai",
                "max_length": int(settings["max-length"]),
                "eos_token_ids": [int(eos)] if eos is not None else [],
                **prompt_format(tokenizer, run.system_prompt),
            },
            "model_file": "model.onnx",
            "tokenizer_file": "tokenizer.json",
            "base_model": {
                "name": meta["base_model"],
                "path": base_path,
                "sha256": merge.base_model_hash(meta["base_model"]),
            },
            "adapter": adapter_provenance(ckpt, info, meta),
            "federation": federation_facts(info),
            "quantization": {k: v for k, v in quant.items() if k != "lora_inputs"},
            "signing_key": fingerprint(key.public_key()),
        }
        if adapter_ready:
            manifest.update(lora_inputs=quant["lora_inputs"], adapter_file=ADAPTER_FILE)
        seal(staging, manifest, key)  # provisional: the gate loads the bundle the way a device does
        reference = parity_reference(settings)
        log.info(
            "[3/4] parity gate: %s vs INT4 on the device runtime, greedy exact match on %d held-out prompts from %s",
            reference,
            len(examples),
            eval_file,
        )
        gate = _device_parity(run, staging, _public_pem(key, work), model, tokenizer, examples, threads)
        manifest["parity"] = apply_gate(
            gate, max_drop_pt, force, eval_file, f"{run_dir}: INT4 exact match drops", reference
        )
        log.info("[4/4] writing the manifest and signing it")
        seal(staging, manifest, key)
        move_into_place(staging, out_dir)
        log.info(
            "bundle: %s (%.1f MB, signed by key %s)",
            out_dir,
            sum(e["bytes"] for e in manifest["files"].values()) / 1e6,
            manifest["signing_key"][:16],
        )
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_adapter_update(
    run_dir: str | Path,
    base_bundle: str | Path,
    out_dir: str | Path,
    signing_key: str | Path,
    *,
    checkpoint: str = "final",
    eval_path: str | Path | None = None,
    max_drop_pt: float = 1.0,
    force: bool = False,
    limit: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """A run's adapter as a signed adapter-only update for `base_bundle` (adapter-ready)."""
    from fedtune.model import resolve_model_path

    from . import merge
    from .exporter import federation_facts, prompt_format
    from .onnx_adapter import ADAPTER_FILE, adapter_arrays, check_fits, write_adapter

    run_dir, out_dir, base_bundle = Path(run_dir), Path(out_dir), Path(base_bundle)
    check_out_dir(out_dir)
    key = load_private_key(signing_key)
    run = RunCheckpoint.open(run_dir, checkpoint)
    info, ckpt, meta, settings = run.info, run.ckpt, run.meta, run.settings
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fedtune-export-", dir=out_dir.parent))
    staging = work / "adapter"
    staging.mkdir()
    try:
        public_key = _public_pem(key, work)
        base_manifest, base_sha = signed_manifest(base_bundle, public_key)
        if not base_manifest.get("lora_inputs"):
            raise FedtuneError(f"--base: {base_bundle} is not an adapter-ready bundle (export it with --adapter-ready)")
        if base_manifest["base_model"]["sha256"] != merge.base_model_hash(meta["base_model"]):
            raise FedtuneError(
                f"--base: {base_bundle} was built from another base model than {run_dir}'s "
                f"({base_manifest['base_model']['name']} vs {meta['base_model']})"
            )
        eval_file, examples = held_out_completions(settings, eval_path, limit, run_dir)
        arrays = adapter_arrays(ckpt)
        check_fits(arrays, base_manifest["lora_inputs"], str(ckpt))
        write_adapter(arrays, staging / ADAPTER_FILE)
        log.info("[1/3] merging %s into %s (fp32, the parity reference)", ckpt.name, meta["base_model"])
        model, tokenizer = merge.merge_adapter(ckpt, work / "merged")
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "kind": "adapter",
            "task": "causal-lm",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fedtune_version": __version__,
            "runtime": {**base_manifest["runtime"], **prompt_format(tokenizer, run.system_prompt)},
            "adapter_file": ADAPTER_FILE,
            "base_bundle": {
                "manifest_sha256": base_sha,
                "base_model": base_manifest["base_model"]["name"],
                "built_from": str(base_bundle),
            },
            "base_model": {
                "name": meta["base_model"],
                "path": resolve_model_path(meta["base_model"]),
                "sha256": base_manifest["base_model"]["sha256"],
            },
            "adapter": adapter_provenance(ckpt, info, meta),
            "federation": federation_facts(info),
            "signing_key": fingerprint(key.public_key()),
        }
        seal(staging, manifest, key)
        log.info(
            "[2/3] parity gate on %s + this adapter, %d held-out prompts from %s", base_bundle, len(examples), eval_file
        )
        gate = _device_parity(run, staging, public_key, model, tokenizer, examples, threads, base=base_bundle)
        manifest["parity"] = apply_gate(
            gate, max_drop_pt, force, eval_file, f"{run_dir}: INT4 exact match drops", parity_reference(run.settings)
        )
        log.info("[3/3] writing the manifest and signing it")
        seal(staging, manifest, key)
        move_into_place(staging, out_dir)
        size = sum(e["bytes"] for e in manifest["files"].values())
        log.info("adapter update: %s (%.2f MB, for base %s)", out_dir, size / 1e6, base_sha[:16])
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
