"""High and low quality: the one definition that rating, split, filter and clustering share.

A row is high quality when its compressed judge score (0-5) is at least the configured threshold
(the paper's rule: score >= 4, i.e. raw >= 8), or, for weak judges whose scores bunch together,
when it is among the best-rated ``top_share`` of rows. A row with no score (the judge failed on it)
is neither: callers quarantine it, never count it as low.

These are stage cores: a ``Dataset`` in, datasets out, no files, no arguments parsing::

    parts = split_by_quality(rated, threshold=4)
    parts.high, parts.low, parts.unscored      # two Datasets and the indices with no score
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from datasets import Dataset

from lmmixup_hf.data.schema import HIGH_QUALITY_THRESHOLD, RATING, LmmixupError


class QualitySplit(NamedTuple):
    high: Dataset
    low: Dataset
    unscored: np.ndarray  # row indices of the input that have no score


def rating_scores(ds: Dataset) -> np.ndarray:
    """The compressed scores of a rated dataset as float64, NaN where there is none; read from
    the Arrow column directly (no Python object per row)."""
    return rating_field(ds, "score", required=True)


def rating_field(ds: Dataset, name: str, required: bool = False) -> np.ndarray:
    """One numeric field of the ``rating`` struct as float64 (NaN where missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if RATING not in ds.column_names:
        raise LmmixupError(f"no `{RATING}` column: rate the rows first (columns: {', '.join(ds.column_names)})")
    table = ds.select_columns([RATING]).with_format("arrow")[: len(ds)]
    col = table.column(RATING).combine_chunks() if len(ds) else pa.array([], pa.struct([("score", pa.int64())]))
    if not pa.types.is_struct(col.type) or col.type.get_field_index(name) < 0:
        if required:
            raise LmmixupError(f"`{RATING}` has no `{name}` field (type {col.type})")
        return np.full(len(ds), np.nan)
    field: Any = pc.struct_field(col, name)
    if col.null_count:  # a null struct must give a null score, whatever the child array holds
        field = pc.if_else(pc.is_valid(col), field, pa.scalar(None, field.type))
    return np.asarray(pc.fill_null(pc.cast(field, pa.float64()), float("nan")).to_numpy(zero_copy_only=False))


def high_quality_mask(
    scores: np.ndarray,
    threshold: int = HIGH_QUALITY_THRESHOLD,
    top_share: float | None = None,
    tiebreak: np.ndarray | None = None,
) -> np.ndarray:
    """Which scored rows are high quality (NaN scores are never high).

    With ``top_share`` the best-rated share of the scored rows is high instead, ranked by score,
    then by ``tiebreak`` (e.g. the judge's expected score), then by position."""
    scores = np.asarray(scores, dtype=np.float64)
    scored = ~np.isnan(scores)
    if top_share is None:
        return scored & (np.nan_to_num(scores, nan=-np.inf) >= threshold)
    if not 0.0 <= top_share <= 1.0:
        raise LmmixupError(f"top_share must be in [0, 1], got {top_share}")
    tb = np.zeros(len(scores)) if tiebreak is None else np.nan_to_num(np.asarray(tiebreak, np.float64), nan=-1.0)
    order = np.lexsort((np.arange(len(scores)), -tb, -np.nan_to_num(scores, nan=-1.0)))
    order = order[scored[order]]
    high = np.zeros(len(scores), dtype=bool)
    high[order[: int(round(top_share * len(order)))]] = True
    return high


def split_by_quality(
    ds: Dataset, threshold: int = HIGH_QUALITY_THRESHOLD, top_share: float | None = None
) -> QualitySplit:
    """Split rated rows into high and low quality by the one quality rule; rows with no score
    (the judge failed) are returned apart, never counted as low.

    Args:
        ds: Rows with a ``rating`` struct (its ``score`` is 0-5, or null).
        threshold: High quality means ``score >= threshold`` (the paper: 4, i.e. raw >= 8).
        top_share: Instead of the threshold, the best-rated share of the rows (score, then the
            judge's expected score), for weak judges whose scores bunch together.

    Returns:
        ``QualitySplit(high, low, unscored)``: two Datasets and the input indices with no score.

    Example:
        >>> from datasets import Dataset
        >>> scores = [(9, 5), (5, 1), (8, 4), (None, None)]
        >>> ds = Dataset.from_list([{"id": str(i), "rating": {"raw": r, "score": s}} for i, (r, s) in enumerate(scores)])
        >>> high, low, unscored = split_by_quality(ds)
        >>> list(high["id"]), list(low["id"]), unscored.tolist()
        (['0', '2'], ['1'], [3])
    """
    scores = rating_scores(ds)
    tiebreak = rating_field(ds, "expected") if top_share is not None else None
    high = high_quality_mask(scores, threshold, top_share, tiebreak)
    unscored = np.isnan(scores)
    return QualitySplit(
        ds.select(np.flatnonzero(high)), ds.select(np.flatnonzero(~unscored & ~high)), np.flatnonzero(unscored)
    )
