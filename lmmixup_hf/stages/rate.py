"""The rate core: the judge's item for every row, ratings attached as a struct, failures by index::

    judge = make_judge("openai", "gpt-4o-mini")
    rated, failed, unratable = rate_rows(dataset, judge)

No files: ``lmmixup rate`` (:mod:`lmmixup_hf.pipeline.rate`) adds checkpoints, batch jobs,
summaries and the manifest around it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from datasets import Dataset, Value

from lmmixup_hf.data.quality import rating_field
from lmmixup_hf.data.schema import (
    COMPLETION,
    PROMPT,
    RATING,
    RAW_MAX,
    RAW_MIN,
    SCORE_MAX,
    SCORE_MIN,
    TASK_TYPE,
    LmmixupError,
)
from lmmixup_hf.judge.judges import DIMENSIONS, JudgeItem, reference_kind
from lmmixup_hf.judge.protocol import Judge

logger = logging.getLogger(__name__)

RATING_FEATURE = {
    "raw": Value("int32"),
    "score": Value("int32"),
    "dims": {d: Value("int32") for d in DIMENSIONS},
    "judge": Value("string"),
    "expected": Value("float64"),
    "reply": Value("string"),
}
_LABELS = {PROMPT: "Instruction", COMPLETION: "Response"}


def _label(column: str) -> str:
    return _LABELS.get(column, column.replace("_", " ").capitalize())


def render_item(row: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The text the judge sees: one field as is, several as labelled blocks."""
    values = []
    for f in fields:
        v = row.get(f)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"field {f!r} is missing or empty")
        values.append((f, v.strip()))
    if len(values) == 1:
        return values[0][1]
    return "\n\n".join(f"{_label(f)}:\n{v}" for f, v in values)


# -- the core: a Dataset in, rated rows out (no files) --------------------------------------------
class RatedRows(NamedTuple):
    rated: Dataset  # rows with a `rating` struct
    failed: list[int]  # input indices the judge failed on (never scored)
    unratable: list[tuple[int, str]]  # input indices with nothing to rate, and why


def judge_items(
    ds: Dataset, fields: Sequence[str], rubric: str = "general", reference_field: str | None = None
) -> tuple[dict[int, JudgeItem], list[tuple[int, str]]]:
    """What the judge sees for each row (by input index); rows with nothing to rate come back apart
    with the reason. ``rubric``: a kind, ``auto`` (each row's task_type) or ``reference``."""
    items: dict[int, JudgeItem] = {}
    unratable: list[tuple[int, str]] = []
    columns = sorted({*fields, *([TASK_TYPE] if TASK_TYPE in ds.column_names else [])} | ({reference_field} - {None}))
    for i, row in enumerate(ds.select_columns(columns)):
        try:
            text = render_item(row, fields)
        except ValueError as e:
            unratable.append((i, str(e)))
            continue
        if rubric == "reference":  # the reference showed the item only
            items[i] = JudgeItem(text, reference_kind(row.get(TASK_TYPE)), style="reference")
            continue
        kind = row.get(TASK_TYPE) if rubric == "auto" else rubric
        ref = row.get(reference_field) if reference_field else None
        items[i] = JudgeItem(text, kind or "general", ref or None)
    return items, unratable


def with_ratings(
    ds: Dataset, items: Mapping[int, JudgeItem], done: Mapping[int, Mapping[str, Any]]
) -> tuple[Dataset, list[int]]:
    """The rated rows (input order) with their ``rating`` struct, and the indices left failed.
    ``done[i]`` is ``{"ok": bool, "rating": struct}`` as the checkpoint stores it."""
    rated = sorted(i for i in items if (done.get(i) or {}).get("ok"))
    failed = sorted(i for i in items if not (done.get(i) or {}).get("ok"))
    base = ds.remove_columns([RATING]) if RATING in ds.column_names else ds
    out = base.select(rated).add_column(RATING, [done[i]["rating"] for i in rated], feature=RATING_FEATURE)
    return out, failed


def rate_rows(
    ds: Dataset,
    judge: Judge,
    *,
    fields: Sequence[str] = (PROMPT, COMPLETION),
    rubric: str = "general",
    reference_field: str | None = None,
    show_progress: bool = False,
) -> RatedRows:
    """Rate a Dataset in memory: a ``rating`` struct per row. Failed rows are returned by
    index, never scored; ``lmmixup rate`` adds checkpoints, retries and batch jobs.

    Args:
        ds: The rows to rate.
        judge: A :class:`~lmmixup_hf.judge.protocol.Judge`, e.g. from
            :func:`~lmmixup_hf.judge.judges.make_judge`.
        fields: Columns shown to the judge, in order.
        rubric: ``general``, a task type (``qa``, ``mcq``, ...), ``auto`` (each row's
            ``task_type``) or ``reference`` (the reference script's prompt).
        reference_field: A column with a reference answer shown after the item, or None.
        show_progress: Show a progress bar.

    Returns:
        ``RatedRows(rated, failed, unratable)``: the rated rows, the input indices the judge
        failed on, and ``(index, reason)`` of rows with nothing to rate.

    Example::

        judge = make_judge("openai", "gpt-4o-mini")
        rated, failed, unratable = rate_rows(load_dataset("json", data_files="pool.jsonl")["train"], judge)
    """
    items, unratable = judge_items(ds, fields, rubric, reference_field)
    order = sorted(items)
    ratings = judge.rate_many([items[i] for i in order], desc="rate", show_progress=show_progress)
    done = {i: {"ok": r.ok, "rating": r.as_struct() if r.ok else None} for i, r in zip(order, ratings)}
    rated, failed = with_ratings(ds, items, done)
    return RatedRows(rated, failed, unratable)


# -- ratings the rows already carry (skip the judge) ---------------------------------------------
SCALES = ("raw", "score")


def carried_scores(
    ds: Dataset, column: str, scale: str = "raw"
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """``(raw, score, bad)`` from scores the rows carry, compressed by the judge's rule.

    ``column``: ``rating`` (a rating struct: its ``score``, else its ``raw`` compressed) or a
    numeric column on the ``scale`` ``raw`` (1-10, ``score = clip(raw, 4, 9) - 4``) or ``score``
    (0-5, as is). ``raw``/``score`` are float64 with NaN where unknown; ``bad`` lists the rows
    without a usable score, with the reason (they are quarantined, never scored 0)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if scale not in SCALES:
        raise LmmixupError(f"--score_scale {scale!r}: expected one of {', '.join(SCALES)}")
    if column not in ds.column_names:
        raise LmmixupError(f"no column {column!r} to take scores from; columns are {', '.join(ds.column_names)}")
    n = len(ds)
    if column == RATING:
        raw, score = rating_field(ds, "raw"), rating_field(ds, "score")
        lo, hi = (RAW_MIN, RAW_MAX), (SCORE_MIN, SCORE_MAX)
        bad_raw = ~np.isnan(raw) & ((raw < lo[0]) | (raw > lo[1]))
        bad_score = ~np.isnan(score) & ((score < hi[0]) | (score > hi[1]))
        score = np.where(np.isnan(score) & ~bad_raw, np.clip(np.rint(raw), 4, 9) - 4, score)
        bad = bad_raw | bad_score
        what = np.where(
            bad_score, f"rating.score out of {SCORE_MIN}..{SCORE_MAX}", f"rating.raw out of {RAW_MIN}..{RAW_MAX}"
        )
    else:
        col = ds.select_columns([column]).with_format("arrow")[:n].column(column)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            raise LmmixupError(f"column {column!r} holds {col.type}, not numbers: cannot take scores from it")
        values = np.asarray(pc.fill_null(pc.cast(col, pa.float64()), float("nan")).to_numpy(zero_copy_only=False))
        lo, hi = (RAW_MIN, RAW_MAX) if scale == "raw" else (SCORE_MIN, SCORE_MAX)
        bad = ~np.isnan(values) & ((values < lo) | (values > hi))
        what = np.full(n, f"{column} out of {lo}..{hi} (--score_scale {scale})", dtype=object)
        raw = values if scale == "raw" else np.full(n, np.nan)
        score = np.clip(np.rint(values), 4, 9) - 4 if scale == "raw" else np.rint(values)
    missing = np.isnan(score) & ~bad
    reasons = [(int(i), f"no score in {column!r}") for i in np.flatnonzero(missing)]
    reasons += [(int(i), str(what[i])) for i in np.flatnonzero(bad)]
    score = np.where(bad, np.nan, score)
    return np.where(np.isnan(score), np.nan, raw), score, sorted(reasons)
