"""``lmmixup distill`` on a cluster: the workers read their own clusters and write their own parts.

The driver reads only the input's ``cluster_id`` column and plans blocks cut at cluster boundaries,
``--checkpoint_every`` clusters each (:func:`~lmmixup_hf.execution.blocks.plan_blocks_at`); each
worker reads its block, distils its clusters with
:class:`~lmmixup_hf.stages.distill.DistillBlock` and writes the records and a completion record
under the stage's work folder. The driver sees only the completion records while the workers run,
then streams the parts in block order into ``data/``, ``unparsed/``, ``failed.jsonl`` and the
quarantine (:func:`write_outputs`, which the local path shares): it never holds the rows.

A rerun skips the completed blocks; a block with failed clusters runs again asking only for those.
An input that is not sorted by cluster (a clusters file made by hand), or whose clusters straddle
two of its files, is first written sorted into one parquet file in the work folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, Features

from lmmixup_hf.data.io import read_pool, write_jsonl
from lmmixup_hf.data.schema import CLUSTER_ID, COMPLETION, ID, MEMBER_IDS, PROMPT, LmmixupError
from lmmixup_hf.data.stage_io import StageWriter, stage_files, write_stage_data
from lmmixup_hf.distiller.engines import Engine
from lmmixup_hf.execution.base import Executor
from lmmixup_hf.execution.blocks import Block, BlockFolder, block_records, map_blocks, plan_blocks_at
from lmmixup_hf.pipeline.registry import stage
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.stages.distill import SCHEMA, DistillBlock, failed_mask, parsed_masks

logger = logging.getLogger(__name__)

BLOCKS = "blocks"  # the parts and completion records, under the stage's work folder
INPUT = "input"  # the input sorted by cluster, when it had to be, under the work folder
FAILED = "failed.jsonl"
NEEDED = (CLUSTER_ID, ID, PROMPT, COMPLETION)


def load_clusters(path: str) -> Dataset:
    """A clusters table (an ``lmmixup cluster`` folder, or parquet/jsonl with ``cluster_id``)."""
    ds = read_pool(path)  # a clusters file's cluster_id comes through as a real column
    _check_columns(path, ds.column_names)
    return ds


def _check_columns(path: str, names: list[str]) -> None:
    missing = [c for c in NEEDED if c not in names]
    if missing:
        raise LmmixupError(
            f"{path}: not a clusters table; missing column(s) {', '.join(missing)} (run `lmmixup cluster` first)"
        )


def _cluster_ids(files: list[str]) -> np.ndarray:
    """The ``cluster_id`` column of ``files``, alone (8 bytes a row)."""
    parts = [pq.read_table(f, columns=[CLUSTER_ID])[CLUSTER_ID].to_numpy() for f in files]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def plan_clusters(
    files: list[str], cids: np.ndarray, per_block: int, limit: int | None
) -> tuple[list[Block], list[int]]:
    """Blocks of ``per_block`` whole clusters (the first ``limit`` clusters only) over rows sorted by
    cluster id, and the clusters of each; leftovers (``cluster_id < 0``, first once sorted) in none."""
    first = int(np.searchsorted(cids, 0))
    tail = cids[first:]
    starts = first + np.flatnonzero(np.r_[True, tail[1:] != tail[:-1]]) if len(tail) else np.zeros(0, np.int64)
    n = len(starts) if limit is None else min(limit, len(starts))
    end = int(starts[n]) if n < len(starts) else len(cids)
    plan = plan_blocks_at(files, [*starts[:n:per_block].tolist(), end]) if n else []
    sizes = [min(per_block, n - i) for i in range(0, n, per_block)]
    return plan, sizes


def cluster_input(source: str, run: StageRun, per_block: int, limit: int | None) -> tuple[list[Block], list[int], int]:
    """The plan over the input (see :func:`plan_clusters`), its clusters per block and its count of
    leftover rows. A stage folder sorted by cluster is read in place (its ``cluster_id`` only);
    anything else is written sorted into ``<work>/input/`` first, once."""
    path = Path(source)
    staged = run.work_dir / INPUT
    if not staged.exists() and path.is_dir() and any((path / "data").glob("*.parquet")):
        files = stage_files(path)
        _check_columns(source, pq.read_schema(files[0]).names)
        cids = _cluster_ids(files)
        if not len(cids) or np.all(cids[1:] >= cids[:-1]):
            try:
                plan, sizes = plan_clusters(files, cids, per_block, limit)
                return plan, sizes, int((cids < 0).sum())
            except ValueError:  # a cluster straddles two files: staged into one below
                pass
    if not staged.exists():
        # the fallback reads the whole input (memory-mapped) and sorts it: its memory may be the input's
        ds = load_clusters(source)
        cids = np.asarray(ds[CLUSTER_ID], dtype=np.int64)
        if not np.all(cids[1:] >= cids[:-1]):
            ds = ds.select(np.argsort(cids, kind="stable"))
        write_stage_data(ds, run.work_dir, INPUT, shard_rows=max(1, len(ds)))
    files = stage_files(run.work_dir, INPUT)
    cids = _cluster_ids(files)
    plan, sizes = plan_clusters(files, cids, per_block, limit)
    return plan, sizes, int((cids < 0).sum())


def distill_on_blocks(
    run: StageRun,
    args: Any,
    executor: Executor,
    make_engine: Callable[[], Engine],
    generation: dict[str, Any],
) -> None:
    """Distil every block that is not complete on ``executor``, then write the stage's outputs from
    the parts (see the module docstring)."""
    from tqdm.auto import tqdm

    plan, sizes, n_leftover = cluster_input(args.input, run, args.checkpoint_every, args.limit)
    n_clusters = sum(sizes)
    if not n_clusters:
        raise LmmixupError(f"{args.input}: no clusters with cluster_id >= 0")
    folder = run.work_dir / BLOCKS
    records = BlockFolder(folder).records()
    done = {b.id: records[b.id] for b in plan if b.done_by(records.get(b.id))}
    left = sum(n if b.id not in done else done[b.id]["failed"] for b, n in zip(plan, sizes))
    if left < n_clusters:
        logger.info("distill: resuming, %d of %d clusters left to distill", left, n_clusters)
    logger.info("distill: %d clusters in %d blocks on %s", n_clusters, len(plan), executor.name)
    make = partial(DistillBlock, make_engine, generation)
    with tqdm(total=n_clusters, desc="distill", unit="cluster", dynamic_ncols=True) as bar:
        bar.update(n_clusters - left)
        for record in map_blocks(executor, make, plan, folder, stage("distill").part("distill"), redo=_has_failed):
            bar.update(record["asked"])
    records = block_records(plan, folder)
    described = {**records[-1]["engine"], "executor": executor.name} if records else {}
    seconds = sum(r["seconds"] for r in records)
    parts = [BlockFolder(folder).part(b.id) for b in plan]
    write_outputs(run, args, parts, seconds, {"clusters": n_clusters, "leftover_rows": n_leftover}, described)


def _has_failed(record: dict[str, Any]) -> bool:
    return record["failed"] > 0


def write_outputs(
    run: StageRun,
    args: Any,
    parts: Iterable[Path],
    seconds: float,
    counts: dict[str, int],
    described: dict[str, Any],
) -> dict[str, Any]:
    """The stage's outputs streamed from the chunks' parts, in order: the parsed records
    (``data/``), the unparsed ones (``unparsed/``, quarantined with their reason), the failed ones
    (``failed.jsonl``), the counts, the throughput and the manifest (partial when any failed)."""
    parts = list(parts)
    schema = Features.from_arrow_schema(SCHEMA).arrow_schema
    write_jsonl(Path(args.out) / FAILED, _failed_rows(parts))
    sums = dict.fromkeys(("records", "distilled", "unparsed", "failed", "dropped", "truncated", "p_tok", "c_tok"), 0)
    with (
        StageWriter(run.out_dir, "data", schema=schema) as good,
        StageWriter(run.out_dir, "unparsed", schema=schema) as bad,
    ):
        for path in parts:
            table = pq.read_table(path).replace_schema_metadata(schema.metadata)
            ok, unparsed, failed = parsed_masks(table)
            good.write(table.filter(ok))
            bad.write(table.filter(unparsed))
            for row in table.filter(unparsed).select([ID, CLUSTER_ID, "raw_response", "parse_error"]).to_pylist():
                reason, raw = row.pop("parse_error"), row["raw_response"]
                run.quarantine.add(args.input, None, "raw_response" if raw is not None else "input", reason, row)
            sums["records"] += table.num_rows
            sums["distilled"] += int(ok.sum())
            sums["unparsed"] += int(unparsed.sum())
            sums["failed"] += int(failed.sum())
            sums["dropped"] += int(np.sum(table["n_dropped_members"].to_numpy(zero_copy_only=False)))
            sums["truncated"] += int(pc.sum(pc.equal(table["finish_reason"], "length")).as_py() or 0)
            sums["p_tok"] += int(np.sum(table["prompt_tokens"].to_numpy(zero_copy_only=False)))
            sums["c_tok"] += int(np.sum(table["completion_tokens"].to_numpy(zero_copy_only=False)))
    p_tok, c_tok = sums["p_tok"], sums["c_tok"]
    throughput = {
        "generation_seconds": round(seconds, 3),
        "rows_per_s": round(sums["records"] / seconds, 4) if seconds else None,
        "completion_tokens_per_s": round(c_tok / seconds, 2) if seconds else None,
        "total_tokens_per_s": round((p_tok + c_tok) / seconds, 2) if seconds else None,
        "prompt_tokens": p_tok,
        "completion_tokens": c_tok,
    }
    counts = {
        **counts,
        "distilled": sums["distilled"],
        "unparsed": sums["unparsed"],
        "failed": sums["failed"],
        "members_dropped": sums["dropped"],
        "truncated": sums["truncated"],
    }
    extra: dict[str, Any] = {"throughput": throughput}
    if described:
        extra["engine"] = described
    n_failed, n_clusters = counts["failed"], counts["clusters"]
    incomplete = f"{n_failed} of {n_clusters} clusters failed (see {FAILED})" if n_failed else None
    manifest = run.finish(None, counts=counts, extra=extra, incomplete=incomplete)
    logger.info(
        "distill: %d clusters -> %d distilled, %d unparsed, %d failed; %.1f completion tokens/s",
        n_clusters,
        counts["distilled"],
        counts["unparsed"],
        n_failed,
        throughput["completion_tokens_per_s"] or 0.0,
    )
    return manifest


def _failed_rows(parts: list[Path]) -> Iterator[dict[str, Any]]:
    """The failed records of the parts, a few columns at a time: ``failed.jsonl``'s lines."""
    for path in parts:
        table = pq.read_table(path, columns=[ID, CLUSTER_ID, MEMBER_IDS, "finish_reason", "parse_error"])
        for r in table.filter(failed_mask(table)).to_pylist():
            yield {ID: r[ID], CLUSTER_ID: r[CLUSTER_ID], MEMBER_IDS: r[MEMBER_IDS], "error": r["parse_error"]}


__all__ = ["BLOCKS", "distill_on_blocks", "load_clusters", "write_outputs"]
