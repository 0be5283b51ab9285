"""The end-of-run `report.md`: settings, per-round table, traffic and final metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedtune.config import RunSettings
from fedtune.run_folder import METRICS_FILE, RoundRecord, Summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _or_blank(value: Any, blank: str = "") -> Any:
    return blank if value is None else value


def write_report(
    path: Path,
    settings: RunSettings,
    records: list[RoundRecord],
    final: Summary,
    plots: list[Path],
    adapter_info: dict[str, Any],
) -> Path:
    """Render report.md from metrics.jsonl records and the final evaluation."""
    lines = [f"# fedtune run report: {final.run_id}", ""]
    lines += [
        "## Summary",
        "",
        f"- Task: `{settings.task}`, base model: `{settings.model}`",
        f"- Strategy: `{settings.strategy}`, rounds completed: {len(records)} of {settings.num_rounds}",
        f"- Sites: {', '.join(sorted({s for r in records for s in r.sites})) or 'none'}",
        f"- LoRA: r={settings.lora_r}, alpha={settings.lora_alpha}, dropout={settings.lora_dropout}, "
        f"targets={adapter_info.get('target_modules')}",
        f"- Privacy: secure aggregation {'on (SecAgg+, CSPRNG masks)' if settings.secagg else 'off'}; "
        + (
            f"sample-level DP-SGD {_dp_mode_words(settings, records)} (noise multiplier "
            f"{settings.dp_noise_multiplier or 'from target'}, "
            f"clip {settings.dp_max_grad_norm}, delta {settings.dp_delta}), worst site epsilon "
            f"{max((r.dp_epsilon_max or 0.0 for r in records), default=0.0):.3f}"
            + (f" of budget {settings.dp_epsilon_budget}" if settings.dp_epsilon_budget > 0 else "")
            if settings.dp
            else "no differential privacy"
        ),
        f"- Tensors exchanged per round: {adapter_info.get('num_tensors')} adapter/head tensors, "
        f"{adapter_info.get('num_params'):,} parameters ({adapter_info.get('fraction_of_model', 0):.4%} of the model)",
        "",
    ]
    if final.central:
        lines += ["## Final central evaluation (held-out file)", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in final.central.items()]
        lines.append("")
    lines += ["## Rounds", ""]
    quality = (
        ("val_accuracy", "accuracy", "acc")
        if settings.task == "seq-cls"
        else ("val_exact_match", "exact_match", "exact match")
    )
    header = [
        "round",
        "train loss",
        "site-val loss",
        f"site-val {quality[2]}",
        f"central {quality[2]}",
        "worst site epsilon",
        "up (bytes)",
        "down (bytes)",
        "failures",
        "seconds",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        agg = r.aggregate
        central = r.central or {}
        lines.append(
            "| "
            + " | ".join(
                _fmt(x)
                for x in (
                    r.round,
                    agg.get("train_loss", ""),
                    agg.get("val_loss", ""),
                    agg.get(quality[0], ""),
                    central.get(quality[1], ""),
                    _or_blank(r.dp_epsilon_max, "skipped" if r.skipped else ""),
                    _or_blank(r.bytes_up),
                    _or_blank(r.bytes_down),
                    r.failures,
                    _or_blank(r.round_seconds),
                )
            )
            + " |"
        )
    refusals = [(r.round, reason) for r in records for reason in r.failure_reasons]
    if refusals:
        lines += ["", "## Sites that failed or refused", "", "| round | site: what it said |", "|---|---|"]
        lines += [f"| {rnd} | {reason.replace('|', '/')} |" for rnd, reason in refusals]
    lines += ["", "## Per-site metrics, last round", ""]
    if records:
        last = records[-1]
        keys = sorted({k for m in last.sites.values() for k in m if k != "node_id"})
        lines += ["| site | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in sorted(last.sites.items()):
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k, "")) for k in keys) + " |")
    lines += ["", "## What the coordinator saw", ""]
    if settings.secagg:
        lines += [
            "- Per round: only the example-weighted mean of the sites' adapter tensors (SecAgg+ unmasks the sum, "
            "never one site's tensors).",
            "- Per site and round: a masked vector (uniformly random integers to the coordinator), the number of "
            "training examples, and aggregate metrics (mean loss, validation accuracy/F1, or perplexity and exact match, epsilon).",
            "- It could not see: any single site's adapter update, raw text, tokens, or any per-example value.",
        ]
    else:
        lines += [
            "- Per site and round: that site's adapter and head tensors in the clear (secure aggregation was off), "
            "the number of training examples, and aggregate metrics (mean loss, validation accuracy/F1, or perplexity and exact match).",
            "- It could not see: raw text, tokens, labels of single examples or any per-example value.",
        ]
    if settings.ffa_lora:
        sent = (
            f"B and the low-rank head's B_h (rank {settings.ffa_head_rank})"
            if settings.ffa_head_rank
            else "B and the head"
        )
        lines.append(
            f"- FFA-LoRA: no A matrix travelled (every party builds them from the shared seed); only {sent} did."
        )
    if settings.head_only:
        lines.append("- DP head-only (`dp-head-only`): no LoRA factor travelled; only the classification head did.")
    if settings.dp:
        lines.append(
            "- DP-SGD bounds what the adapter reveals about any one record inside a site "
            "(sample-level epsilon above); it does not hide a whole site's participation."
        )
    lines += [
        "",
        "## Files",
        "",
        f"- `{METRICS_FILE}`: one JSON line per round (per-site and aggregate metrics, bytes to and from each site).",
        "- `round-NNN/`: the global adapter after each round (PEFT format, `PeftModel.from_pretrained`).",
        "- `final/`: the final global adapter.",
    ]
    lines += [f"- `{p.name}`" for p in plots]
    lines.append("")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)  # rewritten after every round: a reader never sees half a report
    return path


def _dp_mode_words(settings: RunSettings, records: list[RoundRecord]) -> str:
    """How the DP noise was added, in the report's words."""
    if settings.dp_mode != "distributed":
        return f"at each site ({settings.dp_accountant.upper()} accountant)"
    own = max((s.get("dp_epsilon_own_noise", 0.0) for r in records for s in r.sites.values()), default=0.0)
    return (
        f"distributed through SecAgg+ (one step per round, each site adding a share of the noise; "
        f"{settings.dp_accountant.upper()} accountant; worst site epsilon on its own shares alone {own:.3f})"
    )
