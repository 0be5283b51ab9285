"""The `fedtune` command line, one of fedtune's two composition roots (with the
simulation launcher): each command group lives in its own module and calls into the
stage it belongs to.

    run.py       simulate, check-data          export.py    export, keys
    plan.py      plan (a site's memory)
    edge.py      edge predict/pull/rollback    registry.py  certs, registry
    deploy.py    deploy ...

Heavy imports stay inside the commands: `fedtune edge ...` must work where only the
`edge` extra (onnxruntime, tokenizers) is installed, without torch."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fedtune.errors import FedtuneError
from fedtune.flower_env import apply_env

apply_env()  # offline and quiet before any Hugging Face or Flower module is imported

from . import deploy, edge, export, gate, plan, registry, run  # noqa: E402

TRAIN_ONLY_MODULES = {"torch", "transformers", "peft", "flwr", "optimum", "onnx", "opacus", "ray", "safetensors"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated LoRA fine-tuning with Flower: sites train adapters on local data; "
        "the coordinator aggregates only the adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (run, plan, export, gate, edge, deploy, registry):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors, missing files and failed gRPC calls print one line and
    exit 1 (no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FedtuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_ONLY_MODULES:
            raise
        print(
            f"fedtune: error: '{args.command}' needs the train extra (missing module {err.name}): "
            "pip install 'fedtune[train]'",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a file or socket the command needed: one line, the path first
        where = f"{err.filename}: " if err.filename else ""
        print(f"fedtune: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except Exception as err:
        if type(err).__module__.split(".")[0] != "grpc":
            raise
        code, details = getattr(err, "code", lambda: None)(), getattr(err, "details", lambda: "")()
        name = getattr(code, "name", "error")
        print(f"fedtune: error: '{args.command}': gRPC {name}: {details or err}", file=sys.stderr)
        return 1
