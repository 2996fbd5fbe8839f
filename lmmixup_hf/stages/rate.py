"""The rate core: the judge's item for every row, ratings attached as a struct, failures by index::

    judge = make_judge("openai", "gpt-4o-mini")
    rated, failed, unratable = rate_rows(dataset, judge)

No files: ``lmmixup rate`` (:mod:`lmmixup_hf.pipeline.rate`) adds checkpoints, batch jobs,
summaries and the manifest around it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, Value

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
from lmmixup_hf.execution.base import Executor, LocalExecutor, Part
from lmmixup_hf.judge.judges import DIMENSIONS, JudgeItem, Rating, reference_kind
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
    ds: Dataset | pa.Table, fields: Sequence[str], rubric: str = "general", reference_field: str | None = None
) -> tuple[dict[int, JudgeItem], list[tuple[int, str]]]:
    """What the judge sees for each row (by input index); rows with nothing to rate come back apart
    with the reason. ``rubric``: a kind, ``auto`` (each row's task_type) or ``reference``."""
    items: dict[int, JudgeItem] = {}
    unratable: list[tuple[int, str]] = []
    columns = sorted({*fields, *([TASK_TYPE] if TASK_TYPE in ds.column_names else [])} | ({reference_field} - {None}))
    rows = ds.select(columns).to_pylist() if isinstance(ds, pa.Table) else ds.select_columns(columns)
    for i, row in enumerate(rows):
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
    part = Part("rate", max(1, len(order)))  # one block: the judge keeps its requests in flight across all
    ratings = judge_on(LocalExecutor(), lambda: judge, [items[i] for i in order], order, part, {}, show_progress)
    done = {i: {"ok": r.ok, "rating": r.as_struct() if r.ok else None} for i, r in ratings}
    rated, failed = with_ratings(ds, items, done)
    return RatedRows(rated, failed, unratable)


# -- the block function: a worker rates the rows it read itself (Ray), see execution.blocks ---------
RATING_TYPE = Features({RATING: RATING_FEATURE}).arrow_schema.field(RATING).type
# what a block part carries besides the input rows and their rating, for the command's side files
STATUS, ERROR, LINE = "__status", "__error", "__line"  # ok | failed | unratable; why; 1-based input row


class RateBlock:
    """Rate the rows of one block with one judge (built once per worker): the block's rows with
    their ``rating`` struct (null unless ok), plus :data:`STATUS`, :data:`ERROR` and :data:`LINE`.

    Rows are turned into judge items by the rules of :func:`judge_items` (a row with nothing to
    rate is carried with its reason, never dropped); with the block's ``previous`` part, its ok
    ratings are kept and only the other rows are asked again. The completion record counts the
    rows and carries what the judge used."""

    def __init__(
        self,
        make_judge: Callable[[], Judge],
        fields: Sequence[str],
        rubric: str = "general",
        reference_field: str | None = None,
    ):
        self.judge = JudgeBatch(make_judge)
        self.fields, self.rubric, self.reference_field = list(fields), rubric, reference_field

    def __call__(self, rows: pa.Table, block: Any, previous: pa.Table | None) -> tuple[pa.Table, dict[str, Any]]:
        n = rows.num_rows
        items, unratable = judge_items(rows, self.fields, self.rubric, self.reference_field)
        structs: list[dict | None] = [None] * n
        # a row the judge does not report back stays failed (asked again on a rerun), never unratable
        status: list[str] = ["failed" if i in items else "unratable" for i in range(n)]
        errors: list[str | None] = ["not rated" if i in items else None for i in range(n)]
        for i, reason in unratable:
            errors[i] = reason
        if previous is not None:  # keep the ok ratings of the earlier run of this block
            for i, (st, r) in enumerate(zip(previous[STATUS].to_pylist(), previous[RATING].to_pylist())):
                if st == "ok" and i in items:
                    structs[i], status[i], errors[i] = r, "ok", None
        todo = [i for i in sorted(items) if structs[i] is None]
        usage: dict[str, Any] = {}
        if todo:
            for out in self.judge(items_table([items[i] for i in todo], todo)):
                for i, r, used in ratings_of(out):
                    if r is None:
                        add_usage(usage, used)
                    elif r.ok:
                        structs[i], status[i], errors[i] = r.as_struct(), "ok", None
                    else:
                        status[i], errors[i] = "failed", r.error or "not rated"
        base = rows.drop_columns([RATING]) if RATING in rows.column_names else rows
        part = (
            base.append_column(RATING, pa.array(structs, RATING_TYPE))
            .append_column(STATUS, pa.array(status, pa.string()))
            .append_column(ERROR, pa.array(errors, pa.string()))
            .append_column(LINE, pa.array(range(block.start + 1, block.start + n + 1), pa.int64()))
        )
        record = {
            "rated": status.count("ok"),
            "failed": status.count("failed"),
            "unratable": len(unratable),
            "asked": len(todo),
            "usage": usage,
        }
        return part, record


# -- the batch function: what runs on a worker (here, or one per Ray actor) -------------------------
def items_table(items: Sequence[JudgeItem], positions: Sequence[int]) -> pa.Table:
    """Judge items as the rows of a batch, each with the position it is reported back under."""
    return pa.table(
        {
            "pos": pa.array(positions, pa.int64()),
            "text": [it.text for it in items],
            "kind": [it.kind for it in items],
            "reference": pa.array([it.reference for it in items], pa.string()),
            "style": pa.array([it.style for it in items], pa.string()),
        }
    )


class JudgeBatch:
    """Judge a batch of :func:`items_table` rows with one judge (built once, by ``make_judge``).

    Yields result tables as ratings finish (so the caller can checkpoint each at once): per row
    the rating (a JSON struct) or the error; the last row of the batch also carries what the
    batch used (requests, tokens, cost). ``lmmixup rate`` maps it over the rows through its
    executor; :func:`rate_rows` runs it on all rows at once."""

    def __init__(self, make_judge: Callable[[], Judge], show_progress: bool = False):
        self.judge = make_judge()
        self.show_progress = show_progress

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        cols = batch.to_pydict()
        items = [JudgeItem(*f) for f in zip(cols["text"], cols["kind"], cols["reference"], cols["style"])]
        before = self.judge.usage.as_dict()
        finished: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def work() -> None:  # the judge reports each rating as it arrives; the caller yields them
            try:
                result["ratings"] = self.judge.rate_many(
                    items, on_result=lambda i, r: finished.put((i, r)), desc="rate", show_progress=self.show_progress
                )
            except BaseException as e:  # raised in the caller's thread below
                result["error"] = e
            finally:
                finished.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        sent: set[int] = set()
        while True:
            got = [finished.get()]
            while not finished.empty():
                got.append(finished.get_nowait())
            ready = [g for g in got if g is not None]
            if ready:
                sent.update(i for i, _ in ready)
                yield _judged(cols["pos"], ready)
            if got[-1] is None:
                break
        thread.join()
        if "error" in result:
            raise result["error"]
        unreported = [(i, r) for i, r in enumerate(result["ratings"]) if i not in sent]
        if unreported:
            yield _judged(cols["pos"], unreported)
        self.judge.flush()  # a worker may be stopped at any time after its batch is returned
        usage = json.dumps(usage_delta(before, self.judge.usage.as_dict()))
        yield pa.table({"pos": [-1], "rating": [None], "error": [None], "judge": [None], "usage": [usage]}, JUDGED)


JUDGED = pa.schema(
    [
        ("pos", pa.int64()),
        ("rating", pa.string()),
        ("error", pa.string()),
        ("judge", pa.string()),
        ("usage", pa.string()),
    ]
)


def _judged(positions: list[int], ratings: list[tuple[int, Rating]]) -> pa.Table:
    """Result rows of :class:`JudgeBatch`: ``ratings`` are ``(index in the batch, rating)``."""
    return pa.table(
        {
            "pos": [positions[i] for i, _ in ratings],
            "rating": [json.dumps(r.as_struct()) if r.ok else None for _, r in ratings],
            "error": [None if r.ok else (r.error or "no score in the reply") for _, r in ratings],
            "judge": [r.judge for _, r in ratings],
            "usage": [None] * len(ratings),
        },
        JUDGED,
    )


def judge_on(
    executor: Executor,
    make_judge: Callable[[], Judge],
    items: Sequence[JudgeItem],
    positions: Sequence[int],
    part: Part,
    usage: dict[str, Any],
    show_progress: bool = False,
) -> Iterator[tuple[int, Rating]]:
    """Judge ``items`` with :class:`JudgeBatch` on ``executor``: ``(position, rating)`` as each
    arrives; what the judges used (requests, tokens, cost) is added up into ``usage``."""
    make = partial(JudgeBatch, make_judge, show_progress=show_progress)
    for out in executor.map_batches(make, items_table(items, positions), part):
        for i, r, used in ratings_of(out):
            if r is None:
                add_usage(usage, used)
            else:
                yield i, r
    if "cost_usd" in usage:
        usage["cost_usd"] = round(usage["cost_usd"], 6)


def ratings_of(judged: pa.Table) -> Iterator[tuple[int, Rating | None, dict[str, Any] | None]]:
    """``(position, rating, None)`` for each row a :class:`JudgeBatch` rated, and
    ``(-1, None, usage)`` for the row that ends a batch with what it used."""
    for pos, rating, error, judge, used in zip(*(judged[c].to_pylist() for c in JUDGED.names)):
        if pos < 0:
            yield pos, None, json.loads(used)
            continue
        r = Rating.from_struct(json.loads(rating)) if rating else Rating(None, None, judge=judge, error=error)
        yield pos, r, None


def usage_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What a batch added to a usage meter: counters as differences, the rest (model, price) as is."""
    return {k: v - before.get(k, 0) if _counter(v) else v for k, v in after.items()}


def add_usage(total: dict[str, Any], delta: Mapping[str, Any]) -> None:
    """Add one batch's usage (:func:`usage_delta`) to ``total``."""
    for k, v in delta.items():
        total[k] = total.get(k, 0) + v if _counter(v) else v


def _counter(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
