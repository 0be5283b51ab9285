"""`fedtune simulate` (a whole federation on this machine) and `fedtune check-data`
(a site's file read and validated the way training will read it)."""

from __future__ import annotations

import argparse

from .common import absolute_paths, parse_overrides, read_run_config_file

STRATEGIES = ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi"]


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.config import project_run_config

    from .simulation import run_simulation

    overrides = read_run_config_file(args.run_config) if args.run_config else {}
    overrides.update(parse_overrides(args.set or []))
    for key, value in (
        ("num-rounds", args.rounds), ("model", args.model), ("data-path", args.data),
        ("dirichlet-alpha", args.alpha), ("output-dir", args.output_dir), ("run-name", args.run_name),
        ("strategy", args.strategy),
    ):
        if value is not None:
            overrides[key] = value
    if args.resume:
        overrides["resume"] = True
    config = absolute_paths({**project_run_config(), **overrides})
    run_simulation(config, num_sites=args.sites, verbose=args.verbose)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from collections import Counter

    from fedtune.config import RunSettings, project_run_config
    from fedtune.data import load_classification, load_completions

    from_file = read_run_config_file(args.run_config) if args.run_config else {}
    config = {**project_run_config(), **from_file, **parse_overrides(args.set or []),
              **({"task": args.task} if args.task else {})}
    settings = RunSettings.from_run_config(config)
    if settings.task == "seq-cls":
        labels = settings.label_list()
        examples = load_classification(args.file, settings.text_field, settings.label_field, labels)
        counts = Counter(labels[e.label] for e in examples)
        print(f"{args.file}: OK, {len(examples)} examples, {len(counts)} of {len(labels)} labels present")
    else:
        from fedtune.encoding import CompletionEncoder
        from fedtune.model import load_tokenizer

        pairs = load_completions(args.file, settings.prompt_field, settings.completion_field)
        # Tokenised as training will: a pair over max-length is an error naming its line.
        encoder = CompletionEncoder(load_tokenizer(settings.base_model), pairs, settings.max_length, settings.system_prompt)
        longest = max(len(ids) for ids, _ in encoder.rows)
        print(f"{args.file}: OK, {len(pairs)} prompt/completion pairs, longest {longest} of max-length "
              f"{settings.max_length} tokens ({settings.base_model})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sim = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine (Flower Simulation Engine)",
        description="Partition the run's data set across N simulated sites and run the federation. "
        "Defaults come from [tool.flwr.app.config] in pyproject.toml.",
    )
    sim.add_argument("--sites", type=int, default=3, help="number of simulated sites (default: 3)")
    sim.add_argument("--rounds", type=int, help="federated rounds (config: num-rounds)")
    sim.add_argument("--model", help="HF model path or id; 'default' is the task's embedded model "
                     "(seq-cls: MiniLM, causal-lm: SmolLM2-135M-Instruct)")
    sim.add_argument("--run-config", metavar="FILE",
                     help="a TOML file of run-config keys over pyproject's defaults, e.g. configs/banking77-llm.toml")
    sim.add_argument("--data", help="labelled JSONL/CSV to partition across sites (config: data-path)")
    sim.add_argument("--alpha", type=float, help="Dirichlet alpha for the non-IID split (config: dirichlet-alpha)")
    sim.add_argument("--strategy", choices=STRATEGIES, help="aggregation strategy")
    sim.add_argument("--output-dir", help="where run folders go (default: runs)")
    sim.add_argument("--run-name", help="run folder name (default: a timestamp)")
    sim.add_argument("--resume", action="store_true",
                     help="continue --run-name after its last completed round (after a coordinator crash)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override any run-config key, after --run-config (repeatable)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=cmd_simulate)

    chk = sub.add_parser(
        "check-data",
        help="validate a site's data file against the run's settings",
        description="Read and validate a JSONL or CSV data file the way a site would before training.",
    )
    chk.add_argument("file", help="the site's JSONL or CSV file")
    chk.add_argument("--task", choices=["seq-cls", "causal-lm"], help="the task (default: the run config's, seq-cls)")
    chk.add_argument("--run-config", metavar="FILE", help="a TOML file of run-config keys (model, max-length, ...)")
    chk.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key, e.g. labels-file=...")
    chk.set_defaults(func=cmd_check_data)
