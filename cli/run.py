"""`fedtune simulate` (a whole federation on this machine) and `fedtune check-data`
(a site's file read and validated the way training will read it)."""

from __future__ import annotations

import argparse

from fedtune.config import STRATEGIES, TASKS
from fedtune.errors import FedtuneError

from .common import absolute_paths, parse_overrides, read_run_config_file


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.config import default_run_config

    from .simulation import run_simulation

    overrides = read_run_config_file(args.run_config) if args.run_config else {}
    overrides.update(parse_overrides(args.set or []))
    for key, value in (
        ("num-rounds", args.rounds),
        ("model", args.model),
        ("data-path", args.data),
        ("dirichlet-alpha", args.alpha),
        ("output-dir", args.output_dir),
        ("run-name", args.run_name),
        ("strategy", args.strategy),
    ):
        if value is not None:
            overrides[key] = value
    if args.resume:
        overrides["resume"] = True
    config = absolute_paths({**default_run_config(), **overrides})
    run_simulation(config, num_sites=args.sites, verbose=args.verbose)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from collections import Counter

    from fedtune.config import RunSettings, default_run_config
    from fedtune.data import load_classification, load_completions

    from_file = read_run_config_file(args.run_config) if args.run_config else {}
    config = {
        **default_run_config(),
        **from_file,
        **parse_overrides(args.set or []),
        **({"task": args.task} if args.task else {}),
    }
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
        encoder = CompletionEncoder(
            load_tokenizer(settings.base_model), pairs, settings.max_length, settings.system_prompt
        )
        longest = max(len(ids) for ids, _ in encoder.rows)
        print(
            f"{args.file}: OK, {len(pairs)} prompt/completion pairs, longest {longest} of max-length "
            f"{settings.max_length} tokens ({settings.base_model})"
        )
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedtune.run_config_table import differences, listing, write_table

    if args.write_pyproject:
        write_table(Path(args.write_pyproject))
        print(f"{args.write_pyproject}: [tool.flwr.app.config] written from fedtune/config.py")
    elif args.check_pyproject:
        problems = differences(Path(args.check_pyproject))
        if problems:
            raise FedtuneError(
                f"{args.check_pyproject} and fedtune/config.py differ: {'; '.join(problems)} "
                f"(fedtune settings --write-pyproject {args.check_pyproject})"
            )
        print(f"{args.check_pyproject}: [tool.flwr.app.config] matches fedtune/config.py")
    else:
        print(listing(), end="")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from fedtune.run_config_table import listing

    sim = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine (Flower Simulation Engine)",
        description="Partition the run's data set across N simulated sites and run the federation. "
        "Every run-config key and its default is listed below (declared in fedtune/config.py, "
        "the same as [tool.flwr.app.config] in pyproject.toml).",
        epilog="run-config keys (--set KEY=VALUE, or a --run-config file):\n" + listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("--sites", type=int, default=3, help="number of simulated sites (default: 3)")
    sim.add_argument("--rounds", type=int, help="federated rounds (config: num-rounds)")
    sim.add_argument(
        "--model",
        help="HF model path or id; 'default' is the task's embedded model "
        "(seq-cls: MiniLM, causal-lm: SmolLM2-135M-Instruct)",
    )
    sim.add_argument(
        "--run-config",
        metavar="FILE",
        help="a TOML file of run-config keys over pyproject's defaults, e.g. configs/banking77-llm.toml",
    )
    sim.add_argument("--data", help="labelled JSONL/CSV to partition across sites (config: data-path)")
    sim.add_argument("--alpha", type=float, help="Dirichlet alpha for the non-IID split (config: dirichlet-alpha)")
    sim.add_argument("--strategy", choices=STRATEGIES, help="aggregation strategy")
    sim.add_argument("--output-dir", help="where run folders go (default: runs)")
    sim.add_argument("--run-name", help="run folder name (default: a timestamp)")
    sim.add_argument(
        "--resume",
        action="store_true",
        help="continue --run-name after its last completed round (after a coordinator crash)",
    )
    sim.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any run-config key, after --run-config (repeatable)",
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=cmd_simulate)

    chk = sub.add_parser(
        "check-data",
        help="validate a site's data file against the run's settings",
        description="Read and validate a JSONL or CSV data file the way a site would before training.",
    )
    chk.add_argument("file", help="the site's JSONL or CSV file")
    chk.add_argument("--task", choices=TASKS, help="the task (default: the run config's, seq-cls)")
    chk.add_argument("--run-config", metavar="FILE", help="a TOML file of run-config keys (model, max-length, ...)")
    chk.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a run-config key, e.g. labels-file=..."
    )
    chk.set_defaults(func=cmd_check_data)

    st = sub.add_parser(
        "settings",
        help="list every run-config key, its default and help",
        description="Every run-config key, declared once in fedtune/config.py. With a flag, write "
        "or check pyproject's [tool.flwr.app.config] table against the declarations.",
    )
    what = st.add_mutually_exclusive_group()
    what.add_argument("--write-pyproject", metavar="PYPROJECT", help="rewrite the file's [tool.flwr.app.config] table")
    what.add_argument("--check-pyproject", metavar="PYPROJECT", help="exit 1 naming each key where the table differs")
    st.set_defaults(func=cmd_settings)
