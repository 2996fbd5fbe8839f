"""``lmmixup split`` and ``lmmixup filter``: rated rows into high and low quality, by the one rule
(:func:`lmmixup_hf.data.quality.split_by_quality`). Rows with no score (the judge failed) are
quarantined with a reason, never counted as low or scored 0."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from lmmixup_hf.data.io import read_stage_data, write_json, write_stage_data
from lmmixup_hf.data.quality import split_by_quality
from lmmixup_hf.data.schema import HIGH_QUALITY_THRESHOLD, RATING
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
    """Split rated rows into ``high/`` and ``low/`` (:func:`~lmmixup_hf.data.quality.split_by_quality`).
    Each half is a stage folder of its own (data/ + manifest), so later stages read it like any
    other. Unscored rows (the judge failed) are quarantined, never counted as low."""
    run = StageRun("split", args.out, inputs=[args.input], params=args)
    if run.is_complete():
        logger.info("split: up to date, skipping (%s)", args.out)
        return read_stage_data(Path(args.out) / "high")
    ds = read_stage_data(args.input)
    parts = split_by_quality(ds, args.threshold, args.top_share)
    _quarantine_unscored(run, args.input, ds, parts.unscored)
    for name, part in (("high", parts.high), ("low", parts.low)):
        write_stage_data(part, run.out_dir / name)
        write_json(
            run.out_dir / name / MANIFEST,
            {
                "stage": f"split/{name}",
                "fingerprint": f"{run.fingerprint}-{name}",
                "output_fingerprint": content_fingerprint(run.out_dir / name),
                "counts": {"rows_out": len(part)},
                **({"partial_inputs": run.partial_inputs} if run.partial_inputs else {}),
            },
        )
    run.finish(
        None,
        counts={"rows_in": len(ds), "high": len(parts.high), "low": len(parts.low), "unscored": len(parts.unscored)},
        extra={"threshold": args.threshold, "top_share": args.top_share},
    )
    rule = f"top {args.top_share:.0%}" if args.top_share is not None else f"score >= {args.threshold}"
    logger.info("split: %d high, %d low (%s)", len(parts.high), len(parts.low), rule)
    return parts.high


def _quarantine_unscored(run: StageRun, path: str, ds: Dataset, unscored: Any) -> None:
    for i in unscored:
        run.quarantine.add(path, int(i) + 1, RATING, "no score (the judge failed on this row)", ds[int(i)])


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
    ``below/``; rows with no score (the judge failed) are quarantined with a reason, never a 0."""
    run = StageRun("filter", args.out, inputs=[args.input], params=args)
    if run.is_complete():
        logger.info("filter: up to date, skipping (%s)", args.out)
        return run.load()
    ds = read_stage_data(args.input)
    kept, below, unscored = split_by_quality(ds, threshold=args.min_score)
    _quarantine_unscored(run, args.input, ds, unscored)
    run.finish(
        kept,
        counts={"rows_in": len(ds), "rows_out": len(kept), "below_threshold": len(below), "unscored": len(unscored)},
        extra={"min_score": args.min_score},
        splits={"below": below},
    )
    logger.info("filter: kept %d of %d rows with score >= %d", len(kept), len(ds), args.min_score)
    return kept
