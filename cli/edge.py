"""`fedtune edge`: the device's commands (predict, pull, rollback). They import only the
device package, so they run where just the `edge` extra is installed (no torch)."""

from __future__ import annotations

import argparse


def cmd_edge_predict(args: argparse.Namespace) -> int:
    import json

    from fedtune.edge_device.runtime import EdgeModel, bundle_engine

    if bundle_engine(args.bundle) == "onnxruntime-genai":
        return _generate(args)
    model = EdgeModel.load(args.bundle, args.trust_key, threads=args.threads)
    if model.task != "seq-cls":
        print(f"{args.bundle}: a {model.task} bundle from an older fedtune; export it again for onnxruntime-genai")
        return 1
    pred = model.classify([args.text])[0]
    top = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])[: args.top]
    if args.json:
        print(json.dumps({"label": pred.label, "top": dict(top)}))
    else:
        print(f"{pred.label}\t" + "  ".join(f"{label} {p:.3f}" for label, p in top))
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Causal LM: stream the completion to the terminal as tokens come (or print JSON)."""
    import json
    import sys

    from fedtune.edge_device.generative import GenerationOptions, GenerativeModel

    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    with GenerativeModel(args.bundle, args.trust_key, base=args.base, threads=args.threads) as model:
        if args.json:
            print(json.dumps({"completion": model.generate(args.text, options), "model": model.version_info}))
            return 0
        for piece in model.stream(args.text, options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_edge_pull(args: argparse.Namespace) -> int:
    from fedtune.edge_device.pull import pull
    from fedtune.tls import read_pem

    result = pull(
        args.registry,
        args.model,
        args.trust_key,
        args.into,
        version=args.version or "",
        ca=read_pem(args.ca, "CA certificate"),
        cert=read_pem(args.cert, "certificate"),
        key=read_pem(args.key, "key"),
        allow_rollback=args.allow_rollback,
    )
    print(
        f"{args.into}/current -> {result.model} {result.version} (verified; {result.downloaded_bytes:,} bytes "
        f"downloaded, {result.resumed_bytes:,} resumed)"
    )
    return 0


def cmd_edge_rollback(args: argparse.Namespace) -> int:
    from fedtune.edge_device.pull import rollback

    print(f"{args.into}/current -> {rollback(args.into)}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    edge = sub.add_parser("edge", help="device side: run a verified bundle (onnxruntime + tokenizers, no torch)")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True)
    pred = edge_sub.add_parser(
        "predict",
        help="verify a bundle against a trusted key and run one input",
        description="Checks the manifest signature and every file's sha256 before loading anything.",
    )
    pred.add_argument("bundle", help="bundle folder")
    pred.add_argument("text", help="the text to classify, or the prompt to complete (streamed as it is generated)")
    pred.add_argument("--trust-key", required=True, help="the coordinator's Ed25519 public key (PEM)")
    pred.add_argument("--top", type=int, default=3, help="seq-cls: labels to show (default: 3)")
    pred.add_argument("--max-new-tokens", type=int, default=32, help="causal-lm: tokens to generate (default: 32)")
    pred.add_argument("--sample", action="store_true", help="causal-lm: sample instead of greedy decoding")
    pred.add_argument("--temperature", type=float, default=1.0, help="causal-lm sampling temperature (default: 1.0)")
    pred.add_argument("--top-p", type=float, default=1.0, help="causal-lm sampling nucleus (default: 1.0)")
    pred.add_argument("--top-k", type=int, default=50, help="causal-lm sampling top-k (default: 50)")
    pred.add_argument("--seed", type=int, help="causal-lm sampling seed")
    pred.add_argument("--base", help="causal-lm adapter update: the base bundle it fits (default: a folder beside it)")
    pred.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    pred.add_argument("--json", action="store_true", help="print JSON")
    pred.set_defaults(func=cmd_edge_predict)

    pull = edge_sub.add_parser(
        "pull",
        help="download a bundle from a registry, verify it, and make it current",
        description="Checks the version's signed release record first (this model, the version served, a sequence "
        "above the active one's), downloads into DIR/.incoming (resuming an interrupted download), checks the "
        "signature and every sha256, then switches DIR/current atomically and keeps DIR/previous.",
    )
    pull.add_argument("--registry", required=True, help="HOST:PORT of the registry")
    pull.add_argument("--model", required=True, help="model name in the registry")
    pull.add_argument("--version", help="version to pull (default: the latest)")
    pull.add_argument("--trust-key", required=True, help="the coordinator's Ed25519 public key (PEM)")
    pull.add_argument("--into", required=True, help="the device's model folder")
    pull.add_argument("--ca", required=True, help="CA certificate that signed the registry's TLS certificate")
    pull.add_argument("--cert", help="this device's client certificate (mTLS)")
    pull.add_argument("--key", help="this device's client key (mTLS)")
    pull.add_argument(
        "--allow-rollback",
        action="store_true",
        help="accept a release older than the active one (an explicit rollback)",
    )
    pull.set_defaults(func=cmd_edge_pull)
    rb = edge_sub.add_parser("rollback", help="make the previous version current again")
    rb.add_argument("--into", required=True, help="the device's model folder")
    rb.set_defaults(func=cmd_edge_rollback)
