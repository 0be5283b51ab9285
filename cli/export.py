"""`fedtune export` (a run's final adapter to a signed INT8 bundle) and `fedtune keys`
(the coordinator's Ed25519 signing key pair)."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.edge_export.exporter import export_bundle

    from fedtune.logs import setup_logging

    setup_logging()
    manifest = export_bundle(
        args.run_dir, args.out, args.key, eval_path=args.eval, quantization=args.quantization,
        max_accuracy_drop_pt=args.max_drop_pt, force=args.force, limit=args.limit,
    )
    gate = manifest["parity"]
    shown = ("top1_agreement", "torch_accuracy", "onnx_accuracy", "accuracy_drop_pt", "max_abs_logit_delta",
             "torch_perplexity", "onnx_perplexity", "greedy_token_agreement")
    print(f"{args.out}: signed {manifest['task']} bundle, INT8 {manifest['quantization']['mode']}; parity: "
          + ", ".join(f"{k} {gate[k]:.4g}" for k in shown if k in gate))
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from fedtune.edge_device.signature import fingerprint, load_public_key
    from fedtune.edge_export.signing import generate_keypair

    private, public = generate_keypair(args.out, args.name)
    print(f"{private} (private, keep it on the coordinator)\n{public} (public, give it to devices); "
          f"fingerprint {fingerprint(load_public_key(public))[:16]}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    exp = sub.add_parser(
        "export",
        help="merge a run's final adapter, export INT8 ONNX, gate it on parity, sign the bundle",
        description="merge -> ONNX (optimum) -> INT8 (onnxruntime) -> parity gate against the PyTorch "
        "model on held-out data -> manifest + Ed25519 signature. Writes nothing unless every step passes.",
    )
    exp.add_argument("run_dir", help="a finished run folder, e.g. runs/<run-id>")
    exp.add_argument("--out", required=True, help="the bundle folder to create (must not exist or be empty)")
    exp.add_argument("--key", required=True, help="Ed25519 private key (PEM) from `fedtune keys generate`")
    exp.add_argument("--eval", help="held-out JSONL/CSV for the parity gate (default: the run's central-eval-path)")
    exp.add_argument("--quantization", choices=["per-channel", "per-channel-fp32-head", "per-tensor", "weight-only-int8"],
                     help="INT8 mode (default: per-channel for seq-cls, picked by bench/edge.py; weight-only-int8 for causal-lm)")
    exp.add_argument("--max-drop-pt", type=float, default=1.0,
                     help="largest accuracy drop, in points, the INT8 model may show (default: 1.0)")
    exp.add_argument("--force", action="store_true", help="write the bundle even if the parity gate fails")
    exp.add_argument("--limit", type=int, help="use only the first N held-out examples")
    exp.set_defaults(func=cmd_export)

    keys = sub.add_parser("keys", help="signing keys for bundles").add_subparsers(dest="keys_command", required=True)
    gen = keys.add_parser("generate", help="make an Ed25519 key pair (NAME.key private, NAME.pub public)")
    gen.add_argument("--out", default="keys", help="folder for the key files (default: keys)")
    gen.add_argument("--name", default="fedtune", help="file name stem (default: fedtune)")
    gen.set_defaults(func=cmd_keys_generate)
