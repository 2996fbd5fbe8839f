"""The rate stage's summary: score histograms overall and per source, as JSON, markdown and a plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmmixup_hf.data.io import write_json
from lmmixup_hf.data.schema import SCORE_MAX, SCORE_MIN
from lmmixup_hf.plotting import figure

BINS = SCORE_MAX - SCORE_MIN + 1


def tally(scores: np.ndarray, sources: np.ndarray, high: np.ndarray, failed_sources: Sequence[str] = ()) -> dict:
    """Per source: the score histogram, the high-quality count and the failed count, as one integer
    vector (``BINS`` counts, high, failed). Tallies of parts of the rows add up (:func:`add_tally`),
    so a summary can be made block by block without holding the rows."""
    failed = np.asarray(failed_sources, dtype=object)
    out: dict = {}
    for s in {*sources.tolist(), *failed.tolist()}:
        mine = sources == s
        hist = np.bincount(scores[mine], minlength=SCORE_MAX + 1)[SCORE_MIN : SCORE_MAX + 1]
        out[s] = np.concatenate([hist, [int(high[mine].sum()), int((failed == s).sum())]]).astype(np.int64)
    return out


def add_tally(total: dict, part: dict) -> dict:
    """``total`` with ``part`` added to it (in place)."""
    for s, v in part.items():
        total[s] = total[s] + v if s in total else v.copy()
    return total


def _stats(counts: np.ndarray) -> dict[str, Any]:
    hist, high, failed = counts[:BINS], int(counts[BINS]), int(counts[BINS + 1])
    n = int(hist.sum())
    return {
        "n": n,
        "failed": failed,
        "mean_score": round(float((hist * np.arange(SCORE_MIN, SCORE_MAX + 1)).sum() / n), 4) if n else None,
        "high": high,
        "high_share": round(high / n, 4) if n else None,
        "histogram": [int(x) for x in hist],
    }


def summary_of(counts: dict) -> dict:
    """Score histograms (0..5) overall and per source, from a :func:`tally`."""
    total = sum(counts.values(), np.zeros(BINS + 2, np.int64))
    return {"all": _stats(total), "by_source": {s: _stats(counts[s]) for s in sorted(counts)}}


def summarize(scores: np.ndarray, sources: np.ndarray, high: np.ndarray, failed_sources: Sequence[str] = ()) -> dict:
    """Score histograms (0..5) overall and per source."""
    return summary_of(tally(np.asarray(scores, dtype=np.int64), sources, np.asarray(high, bool), failed_sources))


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
