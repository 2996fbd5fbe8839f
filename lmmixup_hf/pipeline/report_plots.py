"""The report's plots: rows, scores, cluster sizes, long-tail scores and time per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmmixup_hf.pipeline.report_collect import StageSummary
from lmmixup_hf.plotting import figure


def plot_counts(stages: list[StageSummary], path: Path) -> bool:
    stages = [s for s in stages if s.rows is not None]
    if not stages:
        return False
    with figure(path, (8, 3.6)) as (fig, ax):
        names = [s.name for s in stages]
        bars = ax.bar(names, [s.rows for s in stages], color="#4C72B0", label="rows out")
        ax.bar(names, [s.rejected for s in stages], bottom=[s.rows for s in stages], color="#DD8452", label="rejected")
        ax.bar_label(bars, padding=2, fontsize=8)
        ax.set_ylabel("rows")
        ax.set_title("Rows per stage")
        ax.legend(fontsize=8)
    return True


def plot_scores(before: np.ndarray, after: np.ndarray, path: Path, thresholds: tuple[Any, Any]) -> bool:
    if not before.size and not after.size:
        return False
    with figure(path, (9, 3.4), ncols=2) as (fig, axes):
        bins = np.arange(-0.5, 6.5, 1.0)
        for ax, values, title, thr, color in (
            (axes[0], before, "Pool (rate)", thresholds[0], "#4C72B0"),
            (axes[1], after, "Distilled (rerate)", thresholds[1], "#55A868"),
        ):
            ok = values[~np.isnan(values)] if values.size else values
            ax.hist(ok, bins=bins, color=color, rwidth=0.85)
            failed = int(values.size - ok.size)
            ax.set_title(f"{title}: n={ok.size}" + (f", {failed} unscored" if failed else ""))
            ax.set_xlabel("score (0-5)")
            ax.set_xticks(range(6))
            if thr is not None:
                ax.axvline(thr - 0.5, color="#C44E52", linestyle="--", label=f"threshold {thr}")
                ax.legend(fontsize=8)
        axes[0].set_ylabel("rows")
    return True


def plot_hist(values: np.ndarray, path: Path, title: str, xlabel: str, discrete: bool = False) -> bool:
    if not values.size:
        return False
    with figure(path, (6, 3.2)) as (fig, ax):
        if discrete:
            bins = np.arange(values.min() - 0.5, values.max() + 1.5, 1.0)
            ax.hist(values, bins=bins, color="#8172B2", rwidth=0.85)
        else:
            ax.hist(values, bins=min(30, max(5, values.size // 3)), color="#8172B2")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
    return True


def plot_time(stages: list[StageSummary], path: Path) -> bool:
    timed = [s for s in stages if s.seconds is not None]
    if not timed:
        return False
    with figure(path, (8, 3.2)) as (fig, ax):
        bars = ax.bar([s.name for s in timed], [s.seconds for s in timed], color="#937860")
        ax.bar_label(bars, labels=[f"{s.seconds:.1f}s" for s in timed], padding=2, fontsize=8)
        ax.set_ylabel("seconds (last execution)")
        ax.set_title("Time per stage")
    return True
