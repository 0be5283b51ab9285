"""`fedtune export` (a run's adapter to a signed bundle: INT8 for classifiers, INT4 for
causal LMs), `fedtune export-adapter` (an adapter-only update for an adapter-ready INT4 base),
`fedtune release` (a signed release record: model, version, sequence) and `fedtune keys`
(the coordinator's Ed25519 signing key pair)."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.edge_export.exporter import export_bundle
    from fedtune.logs import setup_logging

    setup_logging()
    manifest = export_bundle(
        args.run_dir,
        args.out,
        args.key,
        eval_path=args.eval,
        quantization=args.quantization,
        max_accuracy_drop_pt=args.max_drop_pt,
        force=args.force,
        limit=args.limit,
        threads=args.threads,
        int4=int4_options(args),
        adapter_ready=args.adapter_ready,
        checkpoint=args.checkpoint,
    )
    quant = manifest["quantization"]
    what = (
        f"INT4 ({quant['layout']}, {quant['algo']}, block {quant['block_size']})"
        if manifest["task"] == "causal-lm"
        else f"INT8 {quant['mode']}"
    )
    print(f"{args.out}: signed {manifest['task']} bundle, {what}, {_megabytes(manifest)}; parity: {_gate(manifest)}")
    return 0


SHOWN = (
    "top1_agreement",
    "torch_accuracy",
    "onnx_accuracy",
    "torch_exact_match",
    "device_exact_match",
    "completion_agreement",
    "accuracy_drop_pt",
    "max_abs_logit_delta",
)


def _gate(manifest: dict) -> str:  # type: ignore[type-arg]
    gate = manifest["parity"]
    return ", ".join(f"{k} {gate[k]:.4g}" for k in SHOWN if k in gate)


def _megabytes(manifest: dict) -> str:  # type: ignore[type-arg]
    return f"{sum(e['bytes'] for e in manifest['files'].values()) / 1e6:.2f} MB"


def int4_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from fedtune.edge_export.int4_build import Int4Options

    given = {
        "algo": args.int4_algo,
        "block_size": args.int4_block_size,
        "accuracy_level": args.int4_accuracy_level,
        "symmetric": None if args.int4_symmetric is None else args.int4_symmetric == "yes",
        "shared_embeddings": None if args.int4_shared_embeddings is None else args.int4_shared_embeddings == "yes",
        "int8_last_layers": args.int4_int8_last_layers,
        "int8_projections": None
        if args.int4_int8_projections is None
        else tuple(p.strip() for p in args.int4_int8_projections.split(",") if p.strip() and p.strip() != "none"),
    }
    return Int4Options(**{name: value for name, value in given.items() if value is not None})  # the rest: defaults


def cmd_export_adapter(args: argparse.Namespace) -> int:
    from fedtune.edge_export.llm_export import export_adapter_update
    from fedtune.logs import setup_logging

    setup_logging()
    manifest = export_adapter_update(
        args.run_dir,
        args.base,
        args.out,
        args.key,
        checkpoint=args.checkpoint,
        eval_path=args.eval,
        max_drop_pt=args.max_drop_pt,
        force=args.force,
        limit=args.limit,
        threads=args.threads,
    )
    print(
        f"{args.out}: signed adapter update ({_megabytes(manifest)}) for base "
        f"{manifest['base_bundle']['manifest_sha256'][:16]}; parity: {_gate(manifest)}"
    )
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedtune.edge_export.release import release_bundle

    channel = "candidate" if args.candidate else "release"
    out = (
        Path(args.out) if args.out else Path("releases") / args.model / (args.version + ("-candidate" * args.candidate))
    )
    record = release_bundle(args.bundle, args.model, args.version, args.key, out, args.sequence, channel)
    print(
        f"{out}: {record.model} {record.version}, sequence {record.sequence}, manifest "
        f"{record.manifest_sha256[:16]} (publish it: fedtune registry publish {out} ...)"
    )
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from fedtune.edge_device.signature import fingerprint, load_public_key
    from fedtune.edge_export.signing import generate_keypair

    private, public = generate_keypair(args.out, args.name)
    print(
        f"{private} (private, keep it on the coordinator)\n{public} (public, give it to devices); "
        f"fingerprint {fingerprint(load_public_key(public))[:16]}"
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    exp = sub.add_parser(
        "export",
        help="merge a run's adapter, quantise (INT8 classifier / INT4 LLM), gate it on parity, sign the bundle",
        description="seq-cls: merge -> ONNX (optimum) -> INT8 (onnxruntime). causal-lm: merge -> INT4 with "
        "onnxruntime-genai's model builder (or, with --adapter-ready, the base in INT4 with LoRA inputs plus the "
        "run's adapter file). Then a parity gate against the PyTorch fp32 model on held-out data (accuracy, or "
        "greedy exact match) -> manifest + Ed25519 signature. Writes nothing unless every step passes.",
    )
    exp.add_argument("run_dir", help="a finished run folder, e.g. runs/<run-id>")
    exp.add_argument("--out", required=True, help="the bundle folder to create (must not exist or be empty)")
    exp.add_argument("--key", required=True, help="Ed25519 private key (PEM) from `fedtune keys generate`")
    exp.add_argument("--eval", help="held-out JSONL/CSV for the parity gate (default: the run's central-eval-path)")
    exp.add_argument(
        "--quantization",
        choices=["per-channel", "per-channel-fp32-head", "per-tensor", "weight-only-int8"],
        help="INT8 mode (default: per-channel for seq-cls, picked by bench/edge.py; weight-only-int8 for causal-lm)",
    )
    exp.add_argument(
        "--max-drop-pt",
        type=float,
        default=1.0,
        help="largest accuracy drop, in points, the INT8 model may show (default: 1.0)",
    )
    exp.add_argument("--force", action="store_true", help="write the bundle even if the parity gate fails")
    exp.add_argument(
        "--limit",
        type=int,
        help="use only the first N held-out examples (causal-lm default: the run's eval-max-examples)",
    )
    exp.add_argument(
        "--threads", type=int, help="threads for the device runtime in the parity gate (default: all cores)"
    )
    llm = exp.add_argument_group("causal-lm (INT4, onnxruntime-genai)")
    llm.add_argument(
        "--adapter-ready",
        action="store_true",
        help="build the base model in INT4 with LoRA inputs and ship the run's adapter as a file, so "
        "later runs can ship adapter-only updates (`fedtune export-adapter`)",
    )
    llm.add_argument("--checkpoint", default="final", help="which adapter of the run: final (default) or round-NNN")
    llm.add_argument(
        "--int4-algo",
        choices=["rtn", "k_quant", "k_quant_mixed", "default"],
        help="builder quantisation algorithm (default: k_quant_mixed)",
    )
    llm.add_argument("--int4-block-size", type=int, help="weights per scale (default: 32)")
    llm.add_argument(
        "--int4-accuracy-level", type=int, help="4: INT8 activations in the CPU kernel, 0: fp32 (default: 4)"
    )
    llm.add_argument("--int4-symmetric", choices=["yes", "no"], help="symmetric INT4 (default: no)")
    llm.add_argument(
        "--int4-shared-embeddings",
        choices=["yes", "no"],
        help="the embedding reads the quantised LM head (tied models; default: yes)",
    )
    llm.add_argument(
        "--int4-int8-projections",
        metavar="NAMES",
        help="projections kept at 8 bits in every decoder block, comma-separated, or `none` "
        "(default: gate_proj,up_proj)",
    )
    llm.add_argument(
        "--int4-int8-last-layers",
        type=int,
        metavar="N",
        help="every weight of the last N decoder blocks at 8 bits (default: 0)",
    )
    exp.set_defaults(func=cmd_export)

    upd = sub.add_parser(
        "export-adapter",
        help="a run's adapter as a signed adapter-only update for an adapter-ready INT4 bundle",
        description="Writes the run's LoRA weights as an ONNX Runtime adapter file (a few MB) with a manifest "
        "that names the sha256 of the base bundle it fits, after a parity gate on that base (greedy exact match "
        "against the PyTorch fp32 model). Devices holding the base pull it like a bundle.",
    )
    upd.add_argument("run_dir", help="a finished run folder with the same LoRA layout as the base's")
    upd.add_argument("--base", required=True, help="the adapter-ready bundle (`fedtune export --adapter-ready`)")
    upd.add_argument("--out", required=True, help="the folder to create (must not exist or be empty)")
    upd.add_argument("--key", required=True, help="Ed25519 private key (PEM) that signed the base")
    upd.add_argument("--checkpoint", default="final", help="which adapter of the run: final (default) or round-NNN")
    upd.add_argument("--eval", help="held-out JSONL/CSV for the parity gate (default: the run's central-eval-path)")
    upd.add_argument(
        "--max-drop-pt",
        type=float,
        default=1.0,
        help="largest exact-match drop, in points, the device may show (default: 1.0)",
    )
    upd.add_argument("--force", action="store_true", help="write the update even if the parity gate fails")
    upd.add_argument("--limit", type=int, help="use only the first N held-out examples (default: eval-max-examples)")
    upd.add_argument("--threads", type=int, help="threads for the device runtime in the parity gate")
    upd.set_defaults(func=cmd_export_adapter)

    rel = sub.add_parser(
        "release",
        help="release a signed bundle as MODEL VERSION with a sequence number (for the registry)",
        description="Copies the bundle (hard links where possible) and adds release.json + release.sig: the "
        "model name, the version, a sequence number that only grows, and the manifest's sha256, signed with the "
        "bundle's own key. The registry refuses a bundle without one or a sequence not above the last; devices "
        "refuse one for another model or version, or older than the active one (except with --allow-rollback).",
    )
    rel.add_argument("bundle", help="a signed bundle folder (fedtune export or export-adapter)")
    rel.add_argument("--model", required=True, help="the model name devices pull it by")
    rel.add_argument("--version", required=True, help="the version name")
    rel.add_argument(
        "--sequence",
        type=int,
        help="the release's sequence number, above every earlier release of this model "
        "(default: the current UTC time in milliseconds)",
    )
    rel.add_argument("--key", required=True, help="the private key that signed the bundle")
    rel.add_argument(
        "--candidate",
        action="store_true",
        help="a release candidate for the sites' gate (fedtune gate), published as MODEL.candidate; devices refuse it",
    )
    rel.add_argument("--out", help="where to write the release (default: releases/MODEL/VERSION[-candidate])")
    rel.set_defaults(func=cmd_release)

    keys = sub.add_parser("keys", help="signing keys for bundles").add_subparsers(dest="keys_command", required=True)
    gen = keys.add_parser("generate", help="make an Ed25519 key pair (NAME.key private, NAME.pub public)")
    gen.add_argument("--out", default="keys", help="folder for the key files (default: keys)")
    gen.add_argument("--name", default="fedtune", help="file name stem (default: fedtune)")
    gen.set_defaults(func=cmd_keys_generate)
