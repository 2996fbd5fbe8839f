"""``lmmixup split`` and ``lmmixup filter``: rated rows into high and low quality, by the one rule
(:func:`lmmixup_hf.data.quality.split_by_quality`). Rows with no score (the judge failed) are
quarantined with a reason, never counted as low or scored 0."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from lmmixup_hf.data.io import StageWriter, arrow_dataset, iter_stage_batches, read_stage_data, stage_files, write_json
from lmmixup_hf.data.quality import high_quality_mask, rating_field, rating_scores
from lmmixup_hf.data.schema import HIGH_QUALITY_THRESHOLD, RATING, LmmixupError
from lmmixup_hf.execution.base import Executor
from lmmixup_hf.options import Options
from lmmixup_hf.pipeline.workflow import MANIFEST, StageRun, content_fingerprint

logger = logging.getLogger(__name__)


# -- split and filter: two small stages with no module of their own ------------------------------
@dataclass
class SplitArgs(Options):
    input: str = field(metadata={"help": "A rated stage folder (rows with a `rating` struct)."})
    out: str = field(metadata={"help": "Output folder: high/ and low/, each a readable stage folder."})
    threshold: int = field(
        default=HIGH_QUALITY_THRESHOLD,
        metadata={"help": "High quality means compressed score (0-5) >= this.", "range": "[0, 5]"},
    )
    top_share: float | None = field(
        default=None,
        metadata={
            "help": "Instead of the threshold: the best-rated share of rows is high (0.3 = top 30 percent), ranked by "
            "score, then the judge's expected score. For weak judges whose scores bunch together (the demo).",
            "range": "[0, 1]",
        },
    )


def split_rated(args: SplitArgs, executor: Executor | None = None) -> Dataset:
    """Split rated rows into ``high/`` and ``low/`` (the rule of :func:`~lmmixup_hf.data.quality.split_by_quality`).
    Each half is a stage folder of its own (data/ + manifest), so later stages read it like any
    other. Unscored rows (the judge failed) are quarantined, never counted as low. Streams: the
    scores are read first (one column), then the rows go through batch by batch."""
    run = StageRun("split", args.out, inputs=[args.input], params=args)
    if run.is_complete():
        logger.info("split: up to date, skipping (%s)", args.out)
        return read_stage_data(Path(args.out) / "high")
    files = stage_files(args.input)
    scores = _scores(files)
    tiebreak = rating_field(_ratings(files), "expected") if args.top_share is not None else None
    high = high_quality_mask(scores, args.threshold, args.top_share, tiebreak)
    unscored = np.isnan(scores)
    parts = {"high": high, "low": ~unscored & ~high}
    schema = pq.read_schema(files[0])
    writers = {name: StageWriter(run.out_dir / name, mirror=name == "high", schema=schema) for name in parts}
    try:
        _route(run, args.input, files, unscored, {writers[name]: mask for name, mask in parts.items()})
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for name, writer in writers.items():
        writer.commit()
        write_json(
            run.out_dir / name / MANIFEST,
            {
                "stage": f"split/{name}",
                "fingerprint": f"{run.fingerprint}-{name}",
                "output_fingerprint": content_fingerprint(run.out_dir / name),
                "counts": {"rows_out": writer.rows},
                **({"partial_inputs": run.partial_inputs} if run.partial_inputs else {}),
            },
        )
    n_high, n_low = writers["high"].rows, writers["low"].rows
    run.finish(
        None,
        counts={"rows_in": len(scores), "high": n_high, "low": n_low, "unscored": int(unscored.sum())},
        extra={"threshold": args.threshold, "top_share": args.top_share},
    )
    rule = f"top {args.top_share:.0%}" if args.top_share is not None else f"score >= {args.threshold}"
    logger.info("split: %d high, %d low (%s)", n_high, n_low, rule)
    return writers["high"].dataset()


def _ratings(files: list[str]) -> Dataset:
    """Just the ``rating`` column of a stage output (a few bytes a row), for the quality rule."""
    schema = pq.read_schema(files[0])
    if RATING not in schema.names:
        raise LmmixupError(f"no `{RATING}` column: rate the rows first (columns: {', '.join(schema.names)})")
    tables = list(iter_stage_batches(files, columns=[RATING]))
    if not tables:  # an empty stage output (e.g. nothing was distilled): no rows, the same column
        tables = [pa.schema([schema.field(RATING)]).empty_table()]
    return arrow_dataset(pa.concat_tables(tables))


def _scores(files: list[str]) -> np.ndarray:
    return rating_scores(_ratings(files))


def _route(
    run: StageRun, path: str, files: list[str], unscored: np.ndarray, outputs: dict[StageWriter, np.ndarray]
) -> None:
    """One pass over the input: each batch's rows go to the writers whose mask selects them;
    unscored rows go to the quarantine (with their row number and the row)."""
    start = 0
    for table in iter_stage_batches(files):
        end = start + table.num_rows
        for writer, mask in outputs.items():
            writer.write(table.filter(pa.array(mask[start:end])))
        for i in np.flatnonzero(unscored[start:end]):
            row = table.slice(int(i), 1).to_pylist()[0]
            run.quarantine.add(path, start + int(i) + 1, RATING, "no score (the judge failed on this row)", row)
        start = end


@dataclass
class FilterArgs(Options):
    input: str = field(metadata={"help": "A rated stage folder (rows with a `rating` struct)."})
    out: str = field(metadata={"help": "Output folder: data/ (kept) and below/ (under the threshold)."})
    min_score: int = field(
        default=HIGH_QUALITY_THRESHOLD,
        metadata={"help": "Keep rows whose compressed score (0-5) is >= this.", "range": "[0, 5]"},
    )


def filter_rated(args: FilterArgs, executor: Executor | None = None) -> Dataset:
    """Keep rows scored >= ``min_score`` (the same rule as the split). Rows under it go to
    ``below/``; rows with no score (the judge failed) are quarantined with a reason, never a 0.
    Streams, as the split does."""
    run = StageRun("filter", args.out, inputs=[args.input], params=args)
    if run.is_complete():
        logger.info("filter: up to date, skipping (%s)", args.out)
        return run.load()
    files = stage_files(args.input)
    scores = _scores(files)
    kept = high_quality_mask(scores, threshold=args.min_score)
    unscored = np.isnan(scores)
    schema = pq.read_schema(files[0])
    data = StageWriter(run.out_dir, mirror=True, schema=schema)
    below = StageWriter(run.out_dir, "below", schema=schema)
    try:
        _route(run, args.input, files, unscored, {data: kept, below: ~unscored & ~kept})
    except BaseException:
        data.abort()
        below.abort()
        raise
    data.commit()
    below.commit()
    run.finish(
        None,
        counts={
            "rows_in": len(scores),
            "rows_out": data.rows,
            "below_threshold": below.rows,
            "unscored": int(unscored.sum()),
        },
        extra={"min_score": args.min_score},
    )
    logger.info("filter: kept %d of %d rows with score >= %d", data.rows, len(scores), args.min_score)
    return data.dataset()
