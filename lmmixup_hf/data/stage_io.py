"""Stage folders: parquet shards written atomically in large row groups, read back streamed.

Every stage writes ``<out>/<name>/*.parquet`` through :class:`StageWriter` (a crash never leaves
half an output) and its JSON side files through :func:`write_jsonl` / :func:`write_json`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from lmmixup_hf.data.arrow_files import (
    BATCH_BYTES,
    ROW_GROUP_BYTES,
    ROW_GROUP_ROWS,
    batch_rows,
    dataset_batches,
    materialise,
    scratch_dir,
)
from lmmixup_hf.data.schema import PoolFormatError

__all__ = [
    "BATCH_BYTES",
    "StageWriter",
    "iter_stage_batches",
    "read_stage_data",
    "stage_files",
    "write_json",
    "write_jsonl",
    "write_stage_data",
]


# -- stage outputs ------------------------------------------------------------------------------
def read_stage_data(out_dir: str | Path, name: str = "data") -> Dataset:
    """The parquet shards a stage wrote under ``<out_dir>/<name>/``, as a memory-mapped ``Dataset``
    (streamed batch by batch into a scratch Arrow file, so memory stays bounded by a batch)."""
    files = stage_files(out_dir, name)
    return materialise(iter_stage_batches(files), empty=pq.read_schema(files[0]))


def stage_files(out_dir: str | Path, name: str = "data") -> list[str]:
    """The parquet shards of a stage output, in order; a clear error when there are none."""
    files = sorted(str(p) for p in (Path(out_dir) / name).glob("*.parquet"))
    if not files:
        raise PoolFormatError(f"{out_dir}: no {name}/*.parquet (did the stage finish?)")
    return files


def iter_stage_batches(files: list[str], columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A stage output's rows as Arrow tables of about :data:`BATCH_BYTES` each."""
    for f in files:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        for batch in pf.iter_batches(batch_size=batch_rows(size, meta.num_rows), columns=columns):
            yield pa.Table.from_batches([batch])


class StageWriter:
    """Parquet shards for ``<out_dir>/<name>/``, fed a table at a time, swapped in atomically.

    Row groups hold up to :data:`ROW_GROUP_ROWS` rows or about :data:`ROW_GROUP_BYTES` (only one
    row group is held in memory); a new shard starts every ``shard_rows`` rows. Shards are written
    into a hidden folder that :meth:`commit` renames into place, so a crash never leaves half an
    output and a rerun starts clean. With ``mirror`` the rows also go to a scratch Arrow file
    that :meth:`dataset` memory-maps (the stage's return value, without reading the parquet back).

    >>> with StageWriter(out, "high") as w:
    ...     for batch in batches: w.write(batch)
    """

    def __init__(
        self,
        out_dir: str | Path,
        name: str = "data",
        shard_rows: int = 500_000,
        mirror: bool = False,
        schema: pa.Schema | None = None,
    ):
        self.out_dir, self.name, self.shard_rows = Path(out_dir), name, shard_rows
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.schema = schema  # the first table's, unless given (an output with no rows keeps it)
        self.rows = 0
        self._paths: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._mirror_path = scratch_dir() / f"stage-{uuid.uuid4().hex}.arrow" if mirror else None
        self._mirror: pa.ipc.RecordBatchStreamWriter | None = None
        self.paths: list[str] = []

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.cast(self.schema)
        self.rows += table.num_rows
        self._pending.append(table)
        if self._mirror_path is not None:
            self._mirror = self._mirror or pa.ipc.new_stream(str(self._mirror_path), self.schema)
            self._mirror.write_table(table)
        # buffer sizes, not `nbytes` (which walks every list offset of a slice): an upper bound
        self._pending_bytes += table.get_total_buffer_size()
        if sum(t.num_rows for t in self._pending) >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        group = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        self._pending_bytes = 0
        while group.num_rows or self._writer is None:
            if self._writer is None or self._in_shard >= self.shard_rows:
                if self._writer is not None:
                    self._writer.close()
                self._paths.append(self.tmp / f"part-{len(self._paths):05d}.parquet")
                self._writer, self._in_shard = pq.ParquetWriter(str(self._paths[-1]), group.schema), 0
            part = group.slice(0, self.shard_rows - self._in_shard)
            if part.num_rows:
                self._writer.write_table(part, row_group_size=ROW_GROUP_ROWS)
            self._in_shard += part.num_rows
            group = group.slice(part.num_rows)

    def commit(self) -> list[str]:
        """Close the shards (the datasets naming, now that the count is known) and swap them in."""
        if self.schema is None:
            raise PoolFormatError(f"{self.out_dir / self.name}: nothing to write (no rows and no schema)")
        if self._pending or self._writer is None:
            self._pending = self._pending or [self.schema.empty_table()]
            self._flush()
        assert self._writer is not None
        self._writer.close()
        if self._mirror is not None:
            self._mirror.close()
        names = [f"train-{i:05d}-of-{len(self._paths):05d}.parquet" for i in range(len(self._paths))]
        for p, n in zip(self._paths, names):
            os.replace(p, self.tmp / n)
        final = self.out_dir / self.name
        if final.exists():
            old = self.out_dir / f".{self.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(self.tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, final)
        self.paths = [str(final / n) for n in names]
        return self.paths

    def abort(self) -> None:
        """Drop everything written so far (closing may fail again on a full disk: ignored)."""
        for w in (self._writer, self._mirror):
            if w is not None:
                try:
                    w.close()
                except OSError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def dataset(self) -> Dataset:
        """The rows written, memory-mapped (needs ``mirror=True``; else read back from parquet)."""
        if self._mirror_path is None or self._mirror is None:
            return read_stage_data(self.out_dir, self.name)
        return Dataset.from_file(str(self._mirror_path))

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:  # a full disk while closing the last row group: no half output left
            self.abort()
            raise


def write_stage_data(
    data: Dataset | pa.Table | Iterable[pa.Table | pa.RecordBatch],
    out_dir: str | Path,
    name: str = "data",
    shard_rows: int = 500_000,
) -> list[str]:
    """Write rows as parquet shards into ``<out_dir>/<name>/``, replacing what was there atomically
    (:class:`StageWriter`). ``data`` is a ``Dataset``, a table, or a stream of Arrow tables."""
    with StageWriter(out_dir, name, shard_rows) as writer:
        for table in _tables(data):
            writer.write(table)
    return writer.paths


def _tables(data: Dataset | pa.Table | Iterable[pa.Table | pa.RecordBatch]) -> Iterator[pa.Table]:
    """Any row source as a stream of tables; an empty ``Dataset`` still yields its (empty) schema."""
    if isinstance(data, Dataset):
        schema = data.features.arrow_schema  # keeps the `datasets` features in the file metadata
        if not len(data):
            yield schema.empty_table()
        for table in dataset_batches(data, ROW_GROUP_ROWS):
            yield table.cast(schema) if table.schema != schema else table
    elif isinstance(data, pa.Table):
        yield data
    else:
        for t in data:
            yield t if isinstance(t, pa.Table) else pa.Table.from_batches([t])


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write JSON lines atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return n


def write_json(path: str | Path, obj: Any) -> None:
    """Write one JSON document atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
