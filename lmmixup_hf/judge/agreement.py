"""How far two sets of scores agree: confusion, Cohen's kappa (plain and quadratic-weighted), the
high/low agreement at a threshold, and Spearman's rank correlation (for the length bias).

Plain numpy over integer score arrays; ``lmmixup judge-report`` puts them in a report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmmixup_hf.data.schema import HIGH_QUALITY_THRESHOLD, SCORE_MAX, SCORE_MIN

K = SCORE_MAX - SCORE_MIN + 1


def confusion(a: np.ndarray, b: np.ndarray, k: int = K) -> np.ndarray:
    """``(k, k)`` counts: ``c[i, j]`` rows scored ``i`` in ``a`` and ``j`` in ``b`` (scores 0..k-1)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    return np.bincount(a * k + b, minlength=k * k).reshape(k, k)


def kappa_from_confusion(c: np.ndarray, weights: str | None = None) -> float:
    """Cohen's kappa of a confusion matrix; ``weights="quadratic"`` penalises a disagreement by the
    squared distance of the two scores (as scikit-learn's ``cohen_kappa_score`` over all k labels)."""
    c = np.asarray(c, np.float64)
    k = c.shape[0]
    n = c.sum()
    if n == 0:
        return float("nan")
    expected = np.outer(c.sum(1), c.sum(0)) / n
    i, j = np.indices((k, k))
    if weights is None:
        w = (i != j).astype(np.float64)
    elif weights == "quadratic":
        w = (i - j).astype(np.float64) ** 2
    elif weights == "linear":
        w = np.abs(i - j).astype(np.float64)
    else:
        raise ValueError(f"unknown weights {weights!r}; use None, linear or quadratic")
    denom = (w * expected).sum()
    return float(1.0 - (w * c).sum() / denom) if denom else float("nan")


def cohen_kappa(a: np.ndarray, b: np.ndarray, weights: str | None = None, k: int = K) -> float:
    return kappa_from_confusion(confusion(a, b, k), weights)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN when either side is constant."""
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom else float("nan")


def agreement(a: np.ndarray, b: np.ndarray, threshold: int = HIGH_QUALITY_THRESHOLD, k: int = K) -> dict[str, Any]:
    """The judge-report figures for two score arrays of the same rows (scores 0..k-1, no NaN)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    c = confusion(a, b, k)
    ha, hb = (a >= threshold).astype(np.int64), (b >= threshold).astype(np.int64)
    n = len(a)
    return {
        "n": int(n),
        "exact_agreement": float((a == b).mean()) if n else float("nan"),
        "within_one": float((np.abs(a - b) <= 1).mean()) if n else float("nan"),
        "quadratic_kappa": kappa_from_confusion(c, "quadratic"),
        "kappa": kappa_from_confusion(c),
        "threshold": int(threshold),
        "high_share": [float(ha.mean()) if n else float("nan"), float(hb.mean()) if n else float("nan")],
        "high_low_agreement": float((ha == hb).mean()) if n else float("nan"),
        "high_low_kappa": cohen_kappa(ha, hb, k=2),
        "mean_score": [float(a.mean()) if n else float("nan"), float(b.mean()) if n else float("nan")],
        "confusion": c.tolist(),
    }
