"""``lmmixup rate`` on a cluster: the workers read their own rows and write their own parts.

The driver plans blocks of the input's parquet from its metadata (:mod:`lmmixup_hf.execution.blocks`,
rows per block: the rate pool's ``batch_size``); each worker reads its block, rates it with
:class:`~lmmixup_hf.stages.rate.RateBlock` and writes the rated rows and a completion record under
the stage's work folder. The driver sees only the records while the workers run, then streams the
parts in block order into ``data/``, ``failed.jsonl``, the quarantine and the summary: it never
holds the rows, so its memory does not grow with the pool.

A rerun skips the completed blocks; a block with failed rows runs again, keeping its ok ratings
and asking only for the others; with the response cache, a block that was cut short re-asks none
of the requests that had finished. An input that is not a stage folder (a JSONL file, say) is
validated and streamed into parquet in the work folder first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Features

from lmmixup_hf.data.io import MANIFEST_NAME, iter_pool, write_jsonl
from lmmixup_hf.data.quality import high_quality_mask
from lmmixup_hf.data.schema import ID, RATING, SOURCE, LmmixupError
from lmmixup_hf.data.stage_io import StageWriter, stage_files
from lmmixup_hf.execution.base import Executor
from lmmixup_hf.execution.blocks import BlockFolder, block_records, map_blocks, plan_blocks
from lmmixup_hf.judge.protocol import Judge
from lmmixup_hf.pipeline.rate_summary import add_tally, summary_of, tally, write_summary
from lmmixup_hf.pipeline.registry import stage
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.stages.rate import ERROR, LINE, RATING_FEATURE, STATUS, RateBlock, add_usage

logger = logging.getLogger(__name__)

BLOCKS = "blocks"  # the parts and completion records, under the stage's work folder
INPUT = "input"  # an input that is not a stage folder, as parquet, under the work folder
FAILED = "failed.jsonl"


def input_files(source: str, run: StageRun, limit: int | None) -> list[str]:
    """The parquet files the workers read: a stage folder's own, else the input validated (bad rows
    quarantined as the local reader does) and streamed into ``<work>/input/`` (first ``limit`` rows)."""
    path = Path(source)
    if path.is_dir() and any((path / "data").glob("*.parquet")):
        return stage_files(path)
    if path.is_dir() and any(path.glob("*.parquet")) and (path.parent / MANIFEST_NAME).exists():
        return stage_files(path.parent, path.name)  # a split folder, e.g. <longtail>/reference
    with StageWriter(run.work_dir, INPUT) as writer:
        left = limit
        for table in iter_pool(source, quarantine=run.quarantine):
            if left is not None:
                table = table.slice(0, left)
                left -= table.num_rows
            writer.write(table)
            if left == 0:
                break
    return writer.paths


def rate_on_blocks(
    run: StageRun,
    args: Any,
    executor: Executor,
    make_judge: Callable[[], Judge],
    fields: list[str],
    progress: bool = True,
) -> dict[str, Any]:
    """Rate every block that is not complete on ``executor``, then write the stage's outputs from the
    parts (see the module docstring); returns the manifest."""
    files = input_files(args.input, run, args.limit)
    schema = pq.read_schema(files[0])
    missing = [f for f in [*fields, args.reference_field] if f and f not in schema.names]
    if missing:
        raise LmmixupError(f"{args.input}: no column(s) {', '.join(missing)}; columns are {', '.join(schema.names)}")
    part = stage(executor.stage or "rate").parts[0]  # rate's, or rerate's when the pipeline runs it
    plan = plan_blocks(files, executor.batch_size(part), args.limit)
    folder = run.work_dir / BLOCKS
    records = BlockFolder(folder).records()
    done = {b.id: records[b.id] for b in plan if b.done_by(records.get(b.id))}
    again = {b.id for b in plan if b.id in done and done[b.id]["failed"]}
    todo = [b for b in plan if b.id not in done or b.id in again]
    logger.info(
        "rate: %d rows in %d blocks; %d already rated; %d blocks to run (%d with failed rows) on %s (%s)",
        sum(b.rows for b in plan),
        len(plan),
        sum(done[b.id]["rated"] for b in plan if b.id in done),
        len(todo),
        len(again),
        executor.name,
        args.judge_model,
    )
    from tqdm.auto import tqdm

    make = partial(RateBlock, make_judge, fields, args.rubric, args.reference_field)
    total = sum(b.rows for b in todo)
    with tqdm(total=total, desc=f"rate ({executor.name})", unit="row", disable=not progress) as bar:
        for record in map_blocks(executor, make, plan, folder, part, redo=lambda r: r["failed"] > 0):
            bar.update(record["rows"])
    records = block_records(plan, folder)
    parts = [BlockFolder(folder).part(b.id) for b in plan]
    usage = {"executor": executor.name, "mode": "sync", "blocks": len(plan)}
    return finish_blocks(run, args, parts, records, usage, schema)


def finish_blocks(
    run: StageRun,
    args: Any,
    parts: list[Path],
    records: list[dict[str, Any]],
    usage: dict[str, Any],
    input_schema: pa.Schema,
) -> dict[str, Any]:
    """The stage's outputs streamed from the parts, in block order: the rated rows (``data/``),
    ``failed.jsonl``, the quarantine, the summary and the manifest."""
    from lmmixup_hf.judge.judges import RUBRIC_VERSION

    features = Features.from_arrow_schema(input_schema)
    features.pop(RATING, None)
    features[RATING] = RATING_FEATURE
    out_schema = features.arrow_schema
    fields = [f.strip() for f in args.fields.split(",") if f.strip()]

    write_jsonl(Path(args.out) / FAILED, _failed_rows(parts))
    counts = {"rows": 0, "rated": 0, "failed": 0, "high": 0, "low": 0}
    scores_by_source: dict = {}
    with StageWriter(run.out_dir, "data", schema=out_schema) as writer:
        for path in parts:
            table = pq.read_table(path)
            status = table[STATUS]
            rated = table.filter(pc.equal(status, "ok")).select(out_schema.names)
            writer.write(rated.cast(out_schema).replace_schema_metadata(out_schema.metadata))
            scores = np.asarray(pc.struct_field(rated[RATING], "score").to_numpy(zero_copy_only=False), np.int64)
            high = high_quality_mask(scores, args.threshold)
            failed = table.filter(pc.equal(status, "failed"))[SOURCE].to_pylist()
            add_tally(scores_by_source, tally(scores, np.asarray(rated[SOURCE].to_pylist(), object), high, failed))
            counts["rated"] += rated.num_rows
            counts["failed"] += len(failed)
            counts["high"] += int(high.sum())
            unratable = table.filter(pc.equal(status, "unratable")).select([ID, ERROR, LINE]).to_pylist()
            for row in unratable:
                run.quarantine.add(str(args.input), row[LINE], fields[0], f"cannot rate: {row[ERROR]}", {ID: row[ID]})
    counts["rows"] = counts["rated"] + counts["failed"]
    counts["low"] = counts["rated"] - counts["high"]
    summary = summary_of(scores_by_source)
    write_summary(Path(args.out), summary, args.threshold)
    for record in records:
        add_usage(usage, record["usage"])
    if "cost_usd" in usage:
        usage["cost_usd"] = round(usage["cost_usd"], 6)
    manifest = run.finish(
        None,
        counts=counts,
        extra={
            "usage": usage,
            "judge": {
                "engine": args.engine,
                "model": args.judge_model,
                "rubric": args.rubric,
                "rubric_version": RUBRIC_VERSION,
            },
            "summary": summary["all"],
        },
        incomplete=f"{counts['failed']} of {counts['rows']} rows failed (see {FAILED})" if counts["failed"] else None,
    )
    logger.info(
        "rate: %d rated (%d high, %d low), %d failed; usage %s",
        counts["rated"],
        counts["high"],
        counts["low"],
        counts["failed"],
        usage,
    )
    return manifest


def _failed_rows(parts: list[Path]) -> Iterator[dict[str, Any]]:
    """The failed rows of the parts, read a few columns at a time: ``failed.jsonl``'s lines."""
    for path in parts:
        table = pq.read_table(path, columns=[ID, SOURCE, STATUS, ERROR, LINE])
        for row in table.filter(pc.equal(table[STATUS], "failed")).to_pylist():
            yield {ID: row[ID], SOURCE: row[SOURCE], "line": row[LINE], "error": row[ERROR] or "not rated"}


__all__ = ["BLOCKS", "finish_blocks", "input_files", "rate_on_blocks"]
