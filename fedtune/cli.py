"""The `fedtune` command line: run a simulated federation, check a site's data file."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

from fedtune.errors import FedtuneError

PATH_KEYS_FROM_APP = ("data-path", "labels-file", "central-eval-path")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs (TOML values, bare strings allowed) into a dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FedtuneError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Pin path settings to absolute paths so every worker process sees the same files."""
    from fedtune.config import resolve_path

    for key in PATH_KEYS_FROM_APP:
        if config.get(key):
            config[key] = str(resolve_path(str(config[key])).resolve())
    if config.get("output-dir"):
        config["output-dir"] = str(Path(str(config["output-dir"])).expanduser().resolve())
    return config


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.simulation import project_run_config, run_simulation

    overrides = parse_overrides(args.set or [])
    for key, value in (
        ("num-rounds", args.rounds), ("model", args.model), ("data-path", args.data),
        ("dirichlet-alpha", args.alpha), ("output-dir", args.output_dir), ("run-name", args.run_name),
        ("strategy", args.strategy),
    ):
        if value is not None:
            overrides[key] = value
    config = _absolute_paths({**project_run_config(), **overrides})
    run_simulation(config, num_sites=args.sites, verbose=args.verbose)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from collections import Counter

    from fedtune.config import RunSettings
    from fedtune.data import load_classification, load_completions
    from fedtune.simulation import project_run_config

    config = {**project_run_config(), **parse_overrides(args.set or []), "task": args.task}
    settings = RunSettings.from_run_config(config)
    if settings.task == "seq-cls":
        labels = settings.label_list()
        examples = load_classification(args.file, settings.text_field, settings.label_field, labels)
        counts = Counter(labels[e.label] for e in examples)
        print(f"{args.file}: OK, {len(examples)} examples, {len(counts)} of {len(labels)} labels present")
    else:
        pairs = load_completions(args.file, settings.prompt_field, settings.completion_field)
        print(f"{args.file}: OK, {len(pairs)} prompt/completion pairs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated LoRA fine-tuning with Flower: sites train adapters on local data; "
        "the coordinator aggregates only the adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine (Flower Simulation Engine)",
        description="Partition the run's data set across N simulated sites and run the federation. "
        "Defaults come from [tool.flwr.app.config] in pyproject.toml.",
    )
    sim.add_argument("--sites", type=int, default=3, help="number of simulated sites (default: 3)")
    sim.add_argument("--rounds", type=int, help="federated rounds (config: num-rounds)")
    sim.add_argument("--model", help="HF model path or id; 'default' is the embedded MiniLM")
    sim.add_argument("--data", help="labelled JSONL/CSV to partition across sites (config: data-path)")
    sim.add_argument("--alpha", type=float, help="Dirichlet alpha for the non-IID split (config: dirichlet-alpha)")
    sim.add_argument("--strategy", choices=["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi"], help="aggregation strategy")
    sim.add_argument("--output-dir", help="where run folders go (default: runs)")
    sim.add_argument("--run-name", help="run folder name (default: a timestamp)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run-config key (repeatable)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=cmd_simulate)

    chk = sub.add_parser(
        "check-data",
        help="validate a site's data file against the run's settings",
        description="Read and validate a JSONL or CSV data file the way a site would before training.",
    )
    chk.add_argument("file", help="the site's JSONL or CSV file")
    chk.add_argument("--task", choices=["seq-cls", "causal-lm"], default="seq-cls")
    chk.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key, e.g. labels-file=...")
    chk.set_defaults(func=cmd_check_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 1 (no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FedtuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
