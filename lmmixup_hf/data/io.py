"""Read pools into ``datasets.Dataset`` with validation and quarantine; write stage outputs atomically.

Reading streams: rows are validated one at a time and appended in batches to an Arrow file that
the returned dataset memory-maps, so a multi-GB JSONL never sits in Python memory at once.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, load_from_disk

from lmmixup_hf.data.schema import (
    BASE_COLUMNS,
    COMPLETION_KEYS,
    DEFAULT_MAX_CHARS,
    EXTRA,
    ID,
    PROMPT_KEYS,
    LmmixupError,
    RowError,
    normalize_record,
)
from lmmixup_hf.data.validate import iter_validated

MANIFEST_NAME = "manifest.json"  # a stage folder's manifest (see workflow)
POOL_SCHEMA = pa.schema([(c, pa.string()) for c in BASE_COLUMNS] + [(EXTRA, pa.string())])
_BATCH = 10_000
BATCH_BYTES = 64 << 20  # a streamed batch: about this much Arrow data
ROW_GROUP_ROWS = 128 * 1024  # a written row group: at most this many rows ...
ROW_GROUP_BYTES = 128 << 20  # ... or about this many bytes, whichever comes first
_RAW_PREVIEW = 500


class PoolFormatError(LmmixupError):
    """The input is not a pool at all (wrong format, unreadable, no usable rows)."""


@dataclass
class Rejected:
    """One quarantined row: where it was, which field was wrong and why."""

    file: str
    line: int | None
    field: str | None
    reason: str
    raw: str | None = None


class Quarantine:
    """Collects bad rows with a reason; never drops one silently."""

    def __init__(self) -> None:
        self.rows: list[Rejected] = []

    def add(self, file: str, line: int | None, field: str | None, reason: str, raw: Any = None) -> None:
        if raw is not None and not isinstance(raw, str):
            raw = json.dumps(raw, ensure_ascii=False, default=str)
        if raw is not None and len(raw) > _RAW_PREVIEW:
            raw = raw[:_RAW_PREVIEW] + "..."
        self.rows.append(Rejected(str(file), line, field, reason, raw))

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        """Rejects by reason kind (the reason up to its first parenthesis or colon)."""
        return dict(Counter(_reason_kind(r.reason) for r in self.rows))

    def summary(self) -> str:
        if not self.rows:
            return "rejected 0 rows"
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts().items(), key=lambda kv: -kv[1]))
        return f"rejected {len(self.rows)} row{'s' if len(self.rows) != 1 else ''}: {parts}"

    def write(self, path: str | Path) -> None:
        write_jsonl(path, (asdict(r) for r in self.rows))


def _reason_kind(reason: str) -> str:
    """Group reasons by kind: drop the detail in parentheses or after ';', and quoted values."""
    kind = re.split(r" \(|;", reason, maxsplit=1)[0]
    return re.sub(r"\s*'[^']*'", "", kind).strip()


# -- reading ------------------------------------------------------------------------------------
def read_pool(
    source: str | Path,
    *,
    quarantine: Quarantine | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    split: str = "train",
    default_source: str | None = None,
) -> Dataset:
    """The one reader: a pool from JSONL, a JSON array, parquet, a saved ``datasets`` folder, a
    stage output folder (or one of its split folders, e.g. ``<out>/reference``) or a Hub dataset
    id, validated onto the data contract.

    Bad rows go to ``quarantine`` (file, line, field, reason); good rows go on. A stage output
    folder (written by :func:`write_stage_data`) is trusted and memory-mapped as is.
    """
    quarantine = quarantine if quarantine is not None else Quarantine()
    path = Path(source)
    if path.is_dir():
        if (path / "data").is_dir() and any((path / "data").glob("*.parquet")):
            return read_stage_data(path)
        if any(path.glob("*.parquet")) and (path.parent / MANIFEST_NAME).exists():  # e.g. <longtail>/reference
            return read_stage_data(path.parent, path.name)
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = load_from_disk(str(path))
            if not isinstance(ds, Dataset):
                ds = ds[split]
            return _materialise(
                _validate_arrow(_dataset_batches(ds), path, quarantine, max_chars, default_source or "")
            )
        raise PoolFormatError(f"{path}: a folder, but neither a stage output (data/*.parquet) nor a saved dataset")
    if not path.exists():
        if _looks_like_hub_id(str(source)):
            return _read_hub(str(source), split, quarantine, max_chars, default_source)
        raise PoolFormatError(f"{source}: no such file or folder")

    default_source = default_source if default_source is not None else _source_from_name(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return _materialise(_validate_arrow(_parquet_batches(path), path, quarantine, max_chars, default_source))
    return _validate(_iter_rows(path, quarantine), path, quarantine, max_chars, default_source)


def iter_pool(
    source: str | Path,
    *,
    quarantine: Quarantine | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    split: str = "train",
    default_source: str | None = None,
) -> Iterator[pa.Table]:
    """:func:`read_pool` as a stream of validated Arrow tables, for stages whose memory must stay
    bounded by a batch (ingest). Parquet is read, validated and handed on batch by batch; the
    other inputs are read by :func:`read_pool` (memory-mapped) and handed on in batches."""
    quarantine = quarantine if quarantine is not None else Quarantine()
    path = Path(source)
    if path.is_file() and path.suffix.lower() in (".parquet", ".pq"):
        default_source = default_source if default_source is not None else _source_from_name(path)
        yield from _validate_arrow(_parquet_batches(path), path, quarantine, max_chars, default_source)
        return
    ds = read_pool(source, quarantine=quarantine, max_chars=max_chars, split=split, default_source=default_source)
    yield from _dataset_batches(ds)


def _iter_rows(path: Path, quarantine: Quarantine) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _iter_jsonl(path, quarantine)
    if suffix == ".json":
        return _iter_json(path, quarantine)
    raise PoolFormatError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .json or .parquet")


def normalize(
    rows: Dataset | Iterable[Any],
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    default_source: str = "",
    name: str = "<rows>",
) -> tuple[Dataset, Quarantine]:
    """The ingest core: any in-memory rows (a ``Dataset`` from ``load_dataset``, a list of dicts)
    onto the data contract; bad rows come back in the quarantine with their index and reason."""
    quarantine = Quarantine()
    if isinstance(rows, Dataset):
        batches = _validate_arrow(_dataset_batches(rows), Path(name), quarantine, max_chars, default_source)
        return _materialise(batches), quarantine
    numbered = ((i + 1, row) for i, row in enumerate(rows))
    return _validate(numbered, Path(name), quarantine, max_chars, default_source), quarantine


def _source_from_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    return stem[: -len("_low")] if stem.endswith("_low") else stem


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/")) and "." not in parts[0]


def _read_hub(repo_id: str, split: str, quarantine: Quarantine, max_chars: int, default_source: str | None) -> Dataset:
    from datasets import load_dataset

    try:
        ds = load_dataset(repo_id, split=split)
    except Exception as e:  # offline, private, missing: one clear message
        raise PoolFormatError(f"{repo_id}: could not load from the Hub ({type(e).__name__}: {e})") from None
    return _materialise(
        _validate_arrow(_dataset_batches(ds), Path(repo_id), quarantine, max_chars, default_source or "")
    )


def _dataset_batches(ds: Dataset, rows: int = _BATCH) -> Iterator[pa.Table]:
    """A dataset's rows as Arrow tables of ``rows`` rows (its indices mapping applied)."""
    for start in range(0, len(ds), rows):
        yield ds.with_format("arrow")[start : start + rows]


def _iter_jsonl(path: Path, quarantine: Quarantine) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        if f.read(4096).lstrip()[:1] == b"[":
            raise PoolFormatError(f"{path}: this looks like a JSON array, not JSON lines: name it .json")
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                quarantine.add(path, lineno, None, f"invalid UTF-8 (byte {e.start})", raw.decode("utf-8", "replace"))
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                quarantine.add(path, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})", text.rstrip("\n"))


def _iter_json(path: Path, quarantine: Quarantine) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head[:1] == b"{" and b"\n{" in head:  # JSONL saved with a .json suffix
        yield from _iter_jsonl(path, quarantine)
        return
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PoolFormatError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise PoolFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "items", "rows") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        raise PoolFormatError(f"{path}: expected a JSON array of records (or an object with a 'data' list)")
    for i, row in enumerate(data):
        yield i + 1, row  # "line" is the 1-based index in the array


def _parquet_batches(path: Path) -> Iterator[pa.Table]:
    """A parquet pool in batches of about :data:`BATCH_BYTES` (fewer rows when rows are wide)."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PoolFormatError(f"{path}: not a readable parquet file ({e})") from None
    columns = set(pf.schema_arrow.names)
    if not columns & {*PROMPT_KEYS, "messages"} or not columns & {*COMPLETION_KEYS, "messages"}:
        raise PoolFormatError(
            f"{path}: not a pool: a pool needs a prompt column ({', '.join(PROMPT_KEYS)} or messages) and a "
            f"completion column ({', '.join(COMPLETION_KEYS)}); this file has {', '.join(sorted(columns)) or 'none'}"
        )
    meta = pf.metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    rows = _batch_rows(size, meta.num_rows)
    for batch in pf.iter_batches(batch_size=rows):
        yield pa.Table.from_batches([batch])


def _batch_rows(nbytes: int, nrows: int) -> int:
    """Rows per batch so that a batch holds about :data:`BATCH_BYTES`."""
    per_row = max(1, nbytes // max(1, nrows))
    return int(min(ROW_GROUP_ROWS, max(1_024, BATCH_BYTES // per_row)))


def _validate_arrow(
    batches: Iterable[pa.Table], path: Path, quarantine: Quarantine, max_chars: int, default_source: str
) -> Iterator[pa.Table]:
    """Vectorised validation (:mod:`lmmixup_hf.data.validate`) of Arrow input: the good rows,
    batch by batch; bad rows (duplicate ids included) go to the quarantine as the row reader does."""
    n_rejected_before = len(quarantine)
    n_good = 0
    schema: pa.Schema | None = None

    def reject(line: int, field: str | None, reason: str, raw: Any) -> None:
        quarantine.add(path, line, field, reason, raw)

    for table in iter_validated(iter(batches), max_chars=max_chars, default_source=default_source, reject=reject):
        schema = schema or table.schema
        n_good += table.num_rows
        yield table if table.schema == schema else table.cast(schema)
    if n_good == 0:
        _no_rows(path, quarantine.rows[n_rejected_before:])


def _no_rows(path: Path, bad: list[Rejected]) -> None:
    if not bad:
        raise PoolFormatError(f"{path}: no records")
    first = bad[0]
    where = f"line {first.line}" + (f", field {first.field!r}" if first.field else "")
    raise PoolFormatError(f"{path}: not a pool: all {len(bad)} rows are unusable (first: {where}: {first.reason})")


def _materialise(tables: Iterable[pa.Table], empty: pa.Schema | None = None) -> Dataset:
    """Stream tables into a scratch Arrow file and memory-map it as a ``Dataset`` (``empty``: the
    schema to use when there are no tables at all)."""
    out_path = _scratch_dir() / f"pool-{uuid.uuid4().hex}.arrow"
    writer = None
    schema = empty
    try:
        for table in tables:
            if writer is None:
                schema = table.schema
                writer = pa.ipc.new_stream(str(out_path), schema)
            writer.write_table(table if table.schema == schema else table.cast(schema))
        if writer is None and empty is not None:
            writer = pa.ipc.new_stream(str(out_path), empty)
    finally:
        if writer is not None:
            writer.close()
    return Dataset.from_file(str(out_path))


def _validate(
    rows: Iterable[tuple[int, Any]], path: Path, quarantine: Quarantine, max_chars: int, default_source: str
) -> Dataset:
    """Normalise rows into an Arrow file, quarantining the bad ones (including duplicate ids)."""
    n_rejected_before = len(quarantine)
    seen: dict[str, int] = {}
    out_path = _scratch_dir() / f"pool-{uuid.uuid4().hex}.arrow"
    batch: list[dict[str, Any]] = []
    n_good = 0
    with pa.OSFile(str(out_path), "wb") as sink, pa.ipc.new_stream(sink, POOL_SCHEMA) as writer:
        for line, raw in rows:
            try:
                rec = normalize_record(raw, max_chars=max_chars, default_source=default_source)
            except RowError as e:
                quarantine.add(path, line, e.field, e.reason, raw)
                continue
            first = seen.get(rec[ID])
            if first is not None:
                quarantine.add(path, line, ID, f"duplicate id {rec[ID]!r} (first seen at line {first})", raw)
                continue
            seen[rec[ID]] = line
            rec.setdefault(EXTRA, None)
            batch.append(rec)
            n_good += 1
            if len(batch) >= _BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=POOL_SCHEMA))
                batch = []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=POOL_SCHEMA))
    if n_good == 0:
        _no_rows(path, quarantine.rows[n_rejected_before:])
    return lift_extra(Dataset.from_file(str(out_path)))


def lift_extra(ds: Dataset, chunk: int = 50_000) -> Dataset:
    """Turn unknown input fields into real Arrow columns where their type is consistent.

    Validation keeps them in the ``extra`` JSON string so that the streaming writer has one fixed
    schema; here every field whose values share one type (``rating`` structs, ``long_tail`` floats,
    ...) becomes a column of its own, and only fields with mixed types stay in ``extra``. Works in
    chunks, so memory stays bounded by the chunk, not the pool."""
    if not len(ds) or EXTRA not in ds.column_names:
        return ds
    extras = ds.select_columns([EXTRA]).with_format("arrow")[: len(ds)].column(EXTRA)
    if extras.null_count == len(ds):
        return ds
    parts: dict[str, list[pa.Array]] = {}  # per key, one array per chunk
    mixed: set[str] = set()
    n_chunks = -(-len(ds) // chunk)
    for c in range(n_chunks):
        rows = [json.loads(e) if e is not None else {} for e in extras.slice(c * chunk, chunk).to_pylist()]
        for key in sorted({k for r in rows for k in r} - mixed - set(ds.column_names)):
            try:
                parts.setdefault(key, [None] * c).append(pa.array([r.get(key) for r in rows]))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                mixed.add(key)
        for arrs in parts.values():
            if len(arrs) == c:  # the key was absent from this chunk
                arrs.append(None)
    lifted: dict[str, pa.ChunkedArray] = {}
    for key, arrs in sorted(parts.items()):
        types = {a.type for a in arrs if a is not None and not pa.types.is_null(a.type)}
        if key in mixed or len(types) != 1:
            continue
        (tp,) = types
        sizes = [min(chunk, len(ds) - i * chunk) for i in range(n_chunks)]
        lifted[key] = pa.chunked_array(
            [pa.nulls(n, tp) if a is None or pa.types.is_null(a.type) else a for a, n in zip(arrs, sizes)], tp
        )
    if not lifted:
        return ds
    left = []
    for c in range(n_chunks):
        for e in extras.slice(c * chunk, chunk).to_pylist():
            rest = {k: v for k, v in json.loads(e).items() if k not in lifted} if e is not None else {}
            left.append(json.dumps(rest, ensure_ascii=False) if rest else None)
    table = ds.with_format("arrow")[: len(ds)]
    table = table.set_column(table.schema.get_field_index(EXTRA), EXTRA, pa.array(left, pa.string()))
    for key, arr in lifted.items():
        table = table.append_column(key, arr)
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table))


_SCRATCH: Path | None = None


def _scratch_dir() -> Path:
    """A process-private folder for the Arrow files that datasets memory-map."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="lmmixup-"))
        atexit.register(shutil.rmtree, _SCRATCH, True)
    return _SCRATCH


def arrow_dataset(table: pa.Table) -> Dataset:
    """A ``Dataset`` over an in-memory Arrow table, with a fresh fingerprint: ``datasets`` would
    otherwise hash every byte of the table to make one (seconds for a large table)."""
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table), fingerprint=uuid.uuid4().hex)


# -- stage outputs ------------------------------------------------------------------------------
def read_stage_data(out_dir: str | Path, name: str = "data") -> Dataset:
    """The parquet shards a stage wrote under ``<out_dir>/<name>/``, as a memory-mapped ``Dataset``
    (streamed batch by batch into a scratch Arrow file, so memory stays bounded by a batch)."""
    files = stage_files(out_dir, name)
    return _materialise(iter_stage_batches(files), empty=pq.read_schema(files[0]))


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
        for batch in pf.iter_batches(batch_size=_batch_rows(size, meta.num_rows), columns=columns):
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
        self._mirror_path = _scratch_dir() / f"stage-{uuid.uuid4().hex}.arrow" if mirror else None
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
        for w in (self._writer, self._mirror):
            if w is not None:
                w.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def dataset(self) -> Dataset:
        """The rows written, memory-mapped (needs ``mirror=True``; else read back from parquet)."""
        if self._mirror_path is None or self._mirror is None:
            return read_stage_data(self.out_dir, self.name)
        return Dataset.from_file(str(self._mirror_path))

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


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
        for table in _dataset_batches(data, ROW_GROUP_ROWS):
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
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def write_json(path: str | Path, obj: Any) -> None:
    """Write one JSON document atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
