"""The rate stage's summary: score histograms overall and per source, as JSON, markdown and a plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmmixup_hf.data.io import write_json
from lmmixup_hf.data.schema import SCORE_MAX, SCORE_MIN
from lmmixup_hf.plotting import figure


def _stats(scores: np.ndarray, high: np.ndarray, n_failed: int) -> dict[str, Any]:
    hist = np.bincount(scores, minlength=SCORE_MAX + 1)[SCORE_MIN : SCORE_MAX + 1] if len(scores) else np.zeros(6, int)
    return {
        "n": int(len(scores)),
        "failed": int(n_failed),
        "mean_score": round(float(scores.mean()), 4) if len(scores) else None,
        "high": int(high.sum()),
        "high_share": round(float(high.mean()), 4) if len(scores) else None,
        "histogram": [int(x) for x in hist],
    }


def summarize(scores: np.ndarray, sources: np.ndarray, high: np.ndarray, failed_sources: Sequence[str] = ()) -> dict:
    """Score histograms (0..5) overall and per source."""
    failed = np.asarray(failed_sources, dtype=object)
    names = sorted({*sources.tolist(), *failed.tolist()})
    return {
        "all": _stats(scores, high, len(failed)),
        "by_source": {s: _stats(scores[sources == s], high[sources == s], int((failed == s).sum())) for s in names},
    }


def write_summary(out: Path, summary: Mapping[str, Any], threshold: int) -> None:
    """summary.json, a markdown table (summary.md) and a histogram per source (summary.png)."""
    write_json(out / "summary.json", {"threshold": threshold, **summary})
    header = f"| source | rated | failed | mean score | high (score >= {threshold}) | "
    header += " | ".join(f"score {s}" for s in range(SCORE_MIN, SCORE_MAX + 1)) + " |"
    lines = [header, "|" + " --- |" * (5 + SCORE_MAX - SCORE_MIN + 1)]
    rows = [*summary["by_source"].items(), ("**all**", summary["all"])]
    for name, st in rows:
        share = f"{st['high']} ({st['high_share']:.1%})" if st["high_share"] is not None else "0"
        mean = f"{st['mean_score']:.2f}" if st["mean_score"] is not None else "-"
        lines.append(
            f"| {name or '(none)'} | {st['n']} | {st['failed']} | {mean} | {share} | "
            + " | ".join(str(x) for x in st["histogram"])
            + " |"
        )
    (out / "summary.md").write_text("# Rating summary\n\n" + "\n".join(lines) + "\n", encoding="utf-8")

    sources = list(summary["by_source"].items())
    with figure(out / "summary.png", (max(6, 1.2 * (SCORE_MAX + 1)), 4)) as (fig, ax):
        width = 0.8 / max(1, len(sources))
        x = np.arange(SCORE_MIN, SCORE_MAX + 1)
        for k, (name, st) in enumerate(sources):
            ax.bar(
                x + (k - (len(sources) - 1) / 2) * width,
                st["histogram"],
                width,
                label=f"{name or '(none)'} (n={st['n']})",
            )
        ax.axvline(threshold - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(x)
        ax.set_xlabel("score (0-5)")
        ax.set_ylabel("rows")
        ax.set_title("Judge scores by source")
        if sources:
            ax.legend(fontsize="small")
