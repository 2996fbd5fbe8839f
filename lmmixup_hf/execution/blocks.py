"""Blocks: workers read their own rows from a stage's parquet input and write their own output parts.

Instead of the driver reading every row and shipping it to the workers, the driver plans *blocks*
from the parquet metadata alone (a block is a file, a row offset and a row count; its id is its
place in the plan, so the same input gives the same ids on every run) and hands each worker one
small descriptor per call. The worker (:class:`BlockWorker`) reads exactly that slice (only the
row groups it needs), runs the stage's *block function* on it, writes the block's output part
atomically into the stage's block folder and then, also atomically, the block's completion record
(a small JSON file: rows, counts, usage). The record is the completion marker: a part without its
record (a kill between the two writes) is redone, a leftover temporary file is ignored. Only the
record goes back to the driver, so the driver's memory does not grow with the input
(:func:`map_blocks`).

The files must be where every worker sees them: a local path on one machine, a shared file system
(or a mounted object store) on a cluster.

A block function is ``fn(rows, block, previous) -> (part, record)``: ``previous`` is the block's
earlier part when its completion record exists and the caller asked for the block again (e.g. to
re-ask only the rows that failed), else None.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmmixup_hf.execution.base import Executor, Part

BlockFn = Callable[[pa.Table, "Block", "pa.Table | None"], "tuple[pa.Table, dict[str, Any]]"]
BlockFactory = Callable[[], BlockFn]


@dataclass(frozen=True)
class Block:
    """Rows ``[offset, offset + rows)`` of one parquet file; ``start`` is the block's first row in
    the whole input (0-based), ``index`` its place in the plan (its id)."""

    index: int
    file: str
    offset: int
    rows: int
    start: int

    @property
    def id(self) -> str:
        return f"{self.index:08d}"

    def done_by(self, record: dict[str, Any] | None) -> bool:
        """Whether ``record`` completes this block: the same rows of the input (a plan made with
        another block size reuses the ids for other rows, and must not take their records)."""
        return record is not None and record.get("start") == self.start and record.get("rows") == self.rows


def plan_blocks(files: Iterable[str | Path], rows_per_block: int, limit: int | None = None) -> list[Block]:
    """The blocks of ``files`` (in order), ``rows_per_block`` rows each (the last of a file may be
    shorter), from the parquet footers only; ``limit``: the first rows only."""
    out: list[Block] = []
    start, size = 0, max(1, rows_per_block)
    for f in files:
        n = pq.read_metadata(str(f)).num_rows
        if limit is not None:
            n = min(n, limit - start)
        for offset in range(0, max(0, n), size):
            out.append(Block(len(out), str(f), offset, min(size, n - offset), start + offset))
        start += max(0, n)
        if limit is not None and start >= limit:
            break
    return out


def plan_blocks_at(files: Iterable[str | Path], bounds: Sequence[int]) -> list[Block]:
    """Blocks of any size: block ``i`` holds the input's rows ``[bounds[i], bounds[i + 1])``, counted
    over ``files`` in order (e.g. cut at group boundaries, so no group spans two blocks), from the
    parquet footers only. A ``ValueError`` when a block would span two files."""
    files = [str(f) for f in files]
    ends = np.cumsum([pq.read_metadata(f).num_rows for f in files])
    out: list[Block] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        f = int(np.searchsorted(ends, a, side="right"))
        if f >= len(files) or b > ends[f]:
            raise ValueError(f"rows {a}-{b} do not lie in one file of {len(files)}")
        first = int(ends[f - 1]) if f else 0
        out.append(Block(len(out), files[f], int(a) - first, int(b - a), int(a)))
    return out


def read_block(block: Block, columns: list[str] | None = None, cache: dict | None = None) -> pa.Table:
    """The block's rows, reading only the row groups that hold them.

    ``cache``: a worker's one-entry memo of the row groups it decoded last. A row group (up to
    128k rows) usually holds many blocks, and a worker is mostly handed blocks of the same group
    in turn; without the memo each of them would decode the whole group again."""
    pf = pq.ParquetFile(block.file)
    meta = pf.metadata
    groups, first, row = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row + n > block.offset and row < block.offset + block.rows:
            groups.append(g)
            first = row if first is None else first
        row += n
    if not groups:
        return pf.schema_arrow.empty_table() if columns is None else pf.schema_arrow.empty_table().select(columns)
    key = (block.file, tuple(groups), tuple(columns or ()))
    table = cache.get(key) if cache is not None else None
    if table is None:
        table = pf.read_row_groups(groups, columns=columns)
        if cache is not None:
            cache.clear()
            cache[key] = table
    return table.slice(block.offset - (first or 0), block.rows)


class BlockFolder:
    """A stage's block parts and completion records: ``part-<id>.parquet`` and ``part-<id>.json``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def part(self, block_id: str) -> Path:
        return self.path / f"part-{block_id}.parquet"

    def record(self, block_id: str) -> Path:
        return self.path / f"part-{block_id}.json"

    def records(self) -> dict[str, dict[str, Any]]:
        """The completion records written so far, by block id (temporary files are not records)."""
        out = {}
        for p in self.path.glob("part-*.json"):
            out[p.stem.removeprefix("part-")] = json.loads(p.read_text(encoding="utf-8"))
        return out

    def read_record(self, block_id: str) -> dict[str, Any] | None:
        path = self.record(block_id)
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def write(self, block_id: str, table: pa.Table, record: dict[str, Any]) -> None:
        """The part, then its record, each through a temporary file and a rename."""
        _atomic(self.part(block_id), lambda tmp: pq.write_table(table, tmp))
        _atomic(self.record(block_id), lambda tmp: Path(tmp).write_text(json.dumps(record), encoding="utf-8"))

    def read(self, block_id: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.part(block_id), columns=columns)


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class BlockWorker:
    """A batch function over block descriptors (one row each): read the block, run the stage's
    block function (built once per worker), write the part and its record, return the record."""

    def __init__(self, make_fn: BlockFactory, folder: str):
        self.fn = make_fn()
        self.folder = BlockFolder(folder)
        self.groups: dict = {}  # the row groups decoded last (see read_block)

    def __call__(self, descriptors: pa.Table) -> pa.Table:
        ids, records = [], []
        for d in descriptors.to_pylist():
            block = Block(**d)
            previous = self.folder.read(block.id) if block.done_by(self.folder.read_record(block.id)) else None
            part, record = self.fn(read_block(block, cache=self.groups), block, previous)
            record = {**record, "block": block.id, "start": block.start, "rows": block.rows}
            self.folder.write(block.id, part, record)
            ids.append(block.id)
            records.append(json.dumps(record))
        return pa.table({"block": pa.array(ids, pa.string()), "record": pa.array(records, pa.string())})


def map_blocks(
    executor: Executor,
    make_fn: BlockFactory,
    plan: list[Block],
    folder: str | Path,
    part: Part,
    redo: Callable[[dict[str, Any]], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run the block function on every planned block that has no completion record yet (or whose
    record ``redo`` selects), one block per call; the records of the blocks run now, as they finish."""
    done = BlockFolder(folder).records()
    todo = [b for b in plan if not b.done_by(done.get(b.id)) or (redo is not None and redo(done[b.id]))]
    if not todo:
        return
    table = pa.Table.from_pylist([asdict(b) for b in todo])
    worker = partial(BlockWorker, make_fn, str(folder))
    for out in executor.map_batches(worker, table, part, rows_per_call=1):
        yield from (json.loads(r) for r in out["record"].to_pylist())


def block_records(plan: list[Block], folder: str | Path) -> list[dict[str, Any]]:
    """The completion records of ``plan``, in plan order; a clear error when one is missing."""
    done = BlockFolder(folder).records()
    missing = [b.id for b in plan if not b.done_by(done.get(b.id))]
    if missing:
        raise RuntimeError(f"{folder}: {len(missing)} block(s) without a completion record, e.g. {missing[0]}")
    return [done[b.id] for b in plan]
