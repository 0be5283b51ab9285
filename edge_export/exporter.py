"""`fedtune export`: a run folder's final adapter to a signed bundle.

seq-cls: merge (fp32) -> ONNX (optimum) -> fused graph + INT8 (onnxruntime) -> parity gate on
held-out data -> tokenizer + manifest (provenance, privacy, metrics, hashes) -> Ed25519 signature.
causal-lm: INT4 with onnxruntime-genai's builder (`llm_export`).
The bundle is built in a temporary folder beside the target and renamed into place
only when it passed the gate and is signed, so a failed export writes nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtune import __version__
from fedtune.edge_device.bundle import (
    BUNDLE_FORMAT,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    VerifiedBundle,
    file_entries,
    manifest_bytes,
    sha256_file,
)
from fedtune.edge_device.signature import fingerprint
from fedtune.errors import FedtuneError
from fedtune.run_folder import FinishedRun, read_finished_run

from .signing import load_private_key, sign

log = logging.getLogger("fedtune.export")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPT_SENTINEL = "\u2063FEDTUNE_PROMPT\u2063"


class ExportGateError(FedtuneError):
    """The INT8 model lost more accuracy than allowed; no bundle was written."""


def trained_on(settings: dict[str, Any]) -> dict[str, str]:
    """The base precision the sites trained on (runs from before these keys: the defaults)."""
    return {
        key: str(settings.get(key, default)) for key, default in (("base-dtype", "auto"), ("quantize-base", "none"))
    }


def parity_reference(settings: dict[str, Any]) -> str:
    """The model the parity gate compares the device model with, in words: always the
    adapter merged into the fp32 base (never onto 4-bit or 16-bit weights), and the base
    precision the sites trained on when that differed."""
    plain = {"base-dtype": ("auto", "fp32"), "quantize-base": ("none",)}
    trained = [f"{key} {value}" for key, value in trained_on(settings).items() if value not in plain[key]]
    return "PyTorch fp32 (adapter merged into the fp32 base" + (
        f"; the sites trained with {', '.join(trained)})" if trained else ")"
    )


def apply_gate(
    gate: dict[str, Any], max_drop_pt: float, force: bool, eval_file: Path, what: str, reference: str
) -> dict[str, Any]:
    """The parity gate's decision, for every export: the measured drop (`accuracy_drop_pt`,
    points of accuracy or exact match against `reference`, the merged PyTorch model) within
    `max_drop_pt`, or ExportGateError naming `what` dropped; `force` writes it anyway and
    says so in the gate."""
    gate.update(
        {"eval_file": str(eval_file), "max_accuracy_drop_pt": max_drop_pt, "forced": False, "reference": reference}
    )
    log.info("parity: %s", ", ".join(f"{k} {v:.4g}" for k, v in gate.items() if isinstance(v, float)))
    if gate["accuracy_drop_pt"] > max_drop_pt:
        if not force:
            raise ExportGateError(
                f"{what} {gate['accuracy_drop_pt']:.2f} pt against {reference}, over the allowed "
                f"{max_drop_pt:g} pt on {eval_file}; nothing written (use --force to write it anyway)"
            )
        gate["forced"] = True
        log.warning("parity gate failed (%.2f pt) but --force was given", gate["accuracy_drop_pt"])
    return gate


def federation_facts(info: FinishedRun) -> dict[str, Any]:
    """What the manifest says about the federation that produced the adapter."""
    settings = info.run.settings
    records = info.records
    done = [r for r in records if not r.skipped]
    epsilons = [r.dp_epsilon_max for r in records if r.dp_epsilon_max is not None]
    return {
        "run_id": info.run.run_id,
        "rounds": len(done),
        "rounds_skipped": len(records) - len(done),
        "rounds_configured": settings["num-rounds"],
        "sites": max((len(r.sites) for r in records), default=0),
        "strategy": settings["strategy"],
        "ffa_lora": settings["ffa-lora"],
        "secagg": {
            "enabled": bool(settings["secagg"]),
            **(info.secagg or {}),
        },
        "dp": {
            "enabled": bool(settings["dp"]),
            "epsilon": max(epsilons) if epsilons else None,
            "delta": settings["dp-delta"] if settings["dp"] else None,
            "max_grad_norm": settings["dp-max-grad-norm"] if settings["dp"] else None,
            "scope": "sample-level DP-SGD at each site (worst site's epsilon)" if settings["dp"] else None,
        },
        "final_metrics": {
            "central": info.summary.central if info.summary else None,
            "sites_mean": done[-1].aggregate if done else {},
        },
    }


def prompt_format(tokenizer: Any, system_prompt: str = "") -> dict[str, Any]:
    """How the device turns a prompt into ids the way the sites did: the chat template
    (with the run's system prompt) rendered around a sentinel (prefix/suffix), or the
    plain text with special tokens."""
    if not getattr(tokenizer, "chat_template", None):
        return {"prompt_prefix": "", "prompt_suffix": "", "add_special_tokens": True}
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    text = tokenizer.apply_chat_template(
        [*system, {"role": "user", "content": PROMPT_SENTINEL}], add_generation_prompt=True, tokenize=False
    )
    prefix, _, suffix = text.partition(PROMPT_SENTINEL)
    return {"prompt_prefix": prefix, "prompt_suffix": suffix, "add_special_tokens": False}


def check_out_dir(out_dir: Path) -> None:
    """A bundle is never written over an existing one."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FedtuneError(f"{out_dir}: already exists and is not empty; choose another --out")


def held_out_file(settings: dict[str, Any], eval_path: str | Path | None, run_dir: Path) -> Path:
    """The parity gate's held-out data: `--eval`, else the run's central-eval-path."""
    from fedtune.config import resolve_path

    if eval_path:
        return Path(eval_path)
    if settings.get("central-eval-path"):
        return Path(resolve_path(settings["central-eval-path"]))
    raise FedtuneError(
        f"{run_dir}: the run had no central-eval-path; pass --eval FILE with held-out data for the parity gate"
    )


def adapter_provenance(checkpoint: Path, info: FinishedRun, meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `adapter`: which checkpoint, its hashes, round and LoRA settings."""
    settings = info.run.settings
    return {
        "checkpoint": checkpoint.name,
        "sha256": sha256_file(checkpoint / "adapter_model.safetensors"),
        "config_sha256": sha256_file(checkpoint / "adapter_config.json"),
        "round": meta.get("round"),
        "lora": {
            "r": settings["lora-r"],
            "alpha": settings["lora-alpha"],
            "target_modules": info.run.adapter.get("target_modules"),
        },
        "trained_on": trained_on(settings),  # the export merges onto the fp32 base whatever it was
    }


def seal(staging: Path, manifest: dict[str, Any], key: Any) -> None:
    """List every file in `staging` (except manifest and signature), write the manifest, sign it."""
    names = sorted(p.name for p in staging.iterdir() if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE))
    manifest["files"] = file_entries(staging, names)
    raw = manifest_bytes(manifest)
    (staging / MANIFEST_FILE).write_bytes(raw)
    (staging / SIGNATURE_FILE).write_bytes(sign(key, raw))


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished bundle to `out_dir` (which is absent or empty: `check_out_dir`)."""
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(staging, out_dir)


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    signing_key: str | Path,
    *,
    eval_path: str | Path | None = None,
    quantization: str | None = None,
    max_accuracy_drop_pt: float = 1.0,
    force: bool = False,
    limit: int | None = None,
    opset: int | None = None,
    threads: int | None = None,
    int4: Any = None,
    adapter_ready: bool = False,
    checkpoint: str = "final",
) -> dict[str, Any]:
    """Build, gate, sign and write the bundle; returns the manifest."""
    from fedtune.data import load_classification
    from fedtune.edge_device.runtime import EdgeModel
    from fedtune.model import resolve_model_path

    from . import graph_fusion, merge, onnx_export, parity, quantize

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_out_dir(out_dir)
    key = load_private_key(signing_key)
    info = read_finished_run(run_dir)
    settings, meta = info.run.settings, info.adapter_meta
    task, labels = meta["task"], meta.get("labels") or []
    if task == "causal-lm":
        from .llm_export import export_llm_bundle

        return export_llm_bundle(
            run_dir,
            out_dir,
            signing_key,
            options=int4,
            adapter_ready=adapter_ready,
            checkpoint=checkpoint,
            eval_path=eval_path,
            max_drop_pt=max_accuracy_drop_pt,
            force=force,
            limit=limit,
            threads=threads,
        )
    if quantization == "weight-only-int8" or adapter_ready or checkpoint != "final":
        raise FedtuneError("--quantization weight-only-int8, --adapter-ready and --checkpoint are for causal-lm runs")
    eval_file = held_out_file(settings, eval_path, run_dir)
    examples: list[Any] = load_classification(eval_file, settings["text-field"], settings["label-field"], labels)
    examples = examples[:limit] if limit else examples
    mode = quantization or quantize.DEFAULT_MODE_BY_TASK[task]
    max_length = int(settings["max-length"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fedtune-export-", dir=out_dir.parent))
    staging = work / "bundle"
    staging.mkdir()
    try:
        log.info("[1/5] merging the final adapter into %s (fp32)", meta["base_model"])
        model, tokenizer = merge.merge_adapter(run_dir / "final", work / "merged")
        log.info("[2/5] exporting ONNX with optimum (%s)", onnx_export.ONNX_TASKS[task])
        fp32_path = onnx_export.export_onnx(work / "merged", work / "onnx", task, opset)
        log.info("[3/5] fusing the graph and quantising to INT8 (%s)", mode)
        fusion = graph_fusion.fuse_transformer_graph(fp32_path, work / "fused.onnx", work / "merged" / "config.json")
        quant = {**quantize.quantize_int8(work / "fused.onnx", staging / "model.onnx", mode), **fusion}
        quant["opset"] = onnx_export.opset_of(staging / "model.onnx")
        for name in TOKENIZER_FILES:
            if (work / "merged" / name).exists():
                shutil.copy2(work / "merged" / name, staging / name)
        if not (staging / "tokenizer.json").exists():
            raise FedtuneError(
                f"{meta['base_model']}: no fast tokenizer (tokenizer.json); the device runtime needs one"
            )
        runtime = {"max_length": max_length, "pad_token_id": int(tokenizer.pad_token_id or 0)}
        draft = {
            "task": task,
            "labels": labels,
            "runtime": runtime,
            "model_file": "model.onnx",
            "tokenizer_file": "tokenizer.json",
        }
        files = {n: (staging / n).read_bytes() for n in ("model.onnx", "tokenizer.json")}
        edge = EdgeModel(VerifiedBundle(staging, draft, files), threads)
        reference = parity_reference(settings)
        log.info(
            "[4/5] parity gate: %s vs INT8 ONNX on %d held-out examples from %s", reference, len(examples), eval_file
        )
        gate = parity.classification_parity(model, tokenizer, edge, examples, max_length)
        apply_gate(gate, max_accuracy_drop_pt, force, eval_file, f"{run_dir}: INT8 accuracy drops", reference)

        log.info("[5/5] writing the manifest and signing it")
        base_path = resolve_model_path(meta["base_model"])
        manifest = {
            "format": BUNDLE_FORMAT,
            "kind": "model",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fedtune_version": __version__,
            **draft,
            "base_model": {
                "name": meta["base_model"],
                "path": base_path,
                "sha256": merge.base_model_hash(meta["base_model"]),
            },
            "adapter": adapter_provenance(run_dir / "final", info, meta),
            "federation": federation_facts(info),
            "quantization": quant,
            "parity": gate,
            "signing_key": fingerprint(key.public_key()),
        }
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
