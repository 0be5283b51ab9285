"""PNG plots of a run: loss and accuracy per round, per site and global; rewritten after
every round, each file replaced whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

from fedtune.run_folder import RoundRecord

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(records: list[RoundRecord], key: str) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float]]]:
    per_site: dict[str, list[tuple[int, float]]] = {}
    agg: list[tuple[int, float]] = []
    for rec in records:
        for site, metrics in rec.sites.items():
            if key in metrics:
                per_site.setdefault(site, []).append((rec.round, float(metrics[key])))
        if key in rec.aggregate:
            agg.append((rec.round, float(rec.aggregate[key])))
    return per_site, agg


def _plot(ax: Any, records: list[RoundRecord], key: str, central_key: str | None, title: str) -> bool:
    per_site, agg = _series(records, key)
    for site, pts in sorted(per_site.items()):
        ax.plot(*zip(*pts), marker="o", alpha=0.6, label=site)
    if agg:
        ax.plot(*zip(*agg), marker="s", color="black", linewidth=2, label="global (weighted)")
    if central_key:
        central = [(r.round, r.central[central_key]) for r in records if r.central and central_key in r.central]
        if central:
            ax.plot(
                *zip(*central), marker="*", markersize=12, color="crimson", linestyle="--", label="central held-out"
            )
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a round with no figures yet has nothing to name
        ax.legend(fontsize=8)
    return bool(per_site or agg)


def save_plots(records: list[RoundRecord], out_dir: Path, task: str) -> list[Path]:
    """Write loss.png and accuracy.png (seq-cls) or exact_match.png (causal-lm: exact
    match and perplexity); returns the files written."""
    written: list[Path] = []
    panels = [("loss.png", [("train_loss", None, "site train loss"), ("val_loss", "loss", "validation loss")])]
    if task == "seq-cls":
        panels.append(
            (
                "accuracy.png",
                [
                    ("val_accuracy", "accuracy", "validation accuracy"),
                    ("val_macro_f1", "macro_f1", "validation macro-F1"),
                ],
            )
        )
    else:
        panels.append(
            (
                "exact_match.png",
                [
                    ("val_exact_match", "exact_match", "greedy completion exact match"),
                    ("val_perplexity", "perplexity", "completion perplexity"),
                ],
            )
        )
    for name, specs in panels:
        fig, axes = plt.subplots(1, len(specs), figsize=(6 * len(specs), 4.2), squeeze=False)
        for ax, (key, central_key, title) in zip(axes[0], specs):
            _plot(ax, records, key, central_key, title)
        fig.tight_layout()
        path = out_dir / name
        tmp = path.with_name(f".{name}.tmp")
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        os.replace(tmp, path)  # a reader (a browser, a file watcher) never sees half a picture
        written.append(path)
    return written
