"""Read pools into ``datasets.Dataset`` with validation and quarantine.

Stage folders (atomic parquet shards) live in :mod:`lmmixup_hf.data.stage_io` and are re-exported
here, where the rest of the package has always imported them from.

Reading streams: rows are validated one at a time and appended in batches to an Arrow file that
the returned dataset memory-maps, so a multi-GB JSONL never sits in Python memory at once.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, load_from_disk

from lmmixup_hf.data.arrow_files import (  # noqa: F401  (re-exported)
    BATCH_BYTES,
    DATASET_BATCH_ROWS,
    ROW_GROUP_BYTES,
    ROW_GROUP_ROWS,
    arrow_dataset,
    batch_rows,
    dataset_batches,
    materialise,
    scratch_dir,
)
from lmmixup_hf.data.schema import (
    BASE_COLUMNS,
    COMPLETION_KEYS,
    DEFAULT_MAX_CHARS,
    EXTRA,
    ID,
    PROMPT_KEYS,
    PoolFormatError,  # noqa: F401  (re-exported)
    RowError,
    normalize_record,
)
from lmmixup_hf.data.stage_io import (  # noqa: F401  (re-exported: the stage folders' API)
    StageWriter,
    iter_stage_batches,
    read_stage_data,
    stage_files,
    write_json,
    write_jsonl,
    write_stage_data,
)
from lmmixup_hf.data.validate import iter_validated

MANIFEST_NAME = "manifest.json"  # a stage folder's manifest (see workflow)
POOL_SCHEMA = pa.schema([(c, pa.string()) for c in BASE_COLUMNS] + [(EXTRA, pa.string())])
_RAW_PREVIEW = 500


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
            return materialise(_validate_arrow(dataset_batches(ds), path, quarantine, max_chars, default_source or ""))
        raise PoolFormatError(f"{path}: a folder, but neither a stage output (data/*.parquet) nor a saved dataset")
    if not path.exists():
        if _looks_like_hub_id(str(source)):
            return _read_hub(str(source), split, quarantine, max_chars, default_source)
        raise PoolFormatError(f"{source}: no such file or folder")

    default_source = default_source if default_source is not None else _source_from_name(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return materialise(_validate_arrow(_parquet_batches(path), path, quarantine, max_chars, default_source))
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
    yield from dataset_batches(ds)


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
    """The ingest core: any in-memory rows onto the data contract (``id``, ``prompt``,
    ``completion``, ``source``, ``task_type``); a bad row is never dropped silently but comes
    back in the quarantine with its position and reason.

    Args:
        rows: A ``Dataset`` (e.g. from ``load_dataset``) or any iterable of dicts.
        max_chars: Longest accepted prompt or completion, in characters.
        default_source: ``source`` of rows that name none.
        name: What the quarantine calls the input (the "file" of each rejected row).

    Returns:
        ``(pool, quarantine)``: the valid rows, and a :class:`Quarantine` of the others
        (line = 1-based position, field, reason).

    Example:
        >>> pool, rejected = normalize(
        ...     [{"prompt": "What is 2+2?", "completion": "4", "source": "math"}, {"prompt": "Hi", "completion": ""}]
        ... )
        >>> pool.num_rows, pool[0]["task_type"]
        (1, 'qa')
        >>> [(r.line, r.field, r.reason) for r in rejected.rows]
        [(2, 'completion', 'empty')]
    """
    quarantine = Quarantine()
    if isinstance(rows, Dataset):
        batches = _validate_arrow(dataset_batches(rows), Path(name), quarantine, max_chars, default_source)
        return materialise(batches), quarantine
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
    return materialise(
        _validate_arrow(dataset_batches(ds), Path(repo_id), quarantine, max_chars, default_source or "")
    )


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
    rows = batch_rows(size, meta.num_rows)
    for batch in pf.iter_batches(batch_size=rows):
        yield pa.Table.from_batches([batch])


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


def _validate(
    rows: Iterable[tuple[int, Any]], path: Path, quarantine: Quarantine, max_chars: int, default_source: str
) -> Dataset:
    """Normalise rows into an Arrow file, quarantining the bad ones (including duplicate ids)."""
    n_rejected_before = len(quarantine)
    seen: dict[str, int] = {}
    out_path = scratch_dir() / f"pool-{uuid.uuid4().hex}.arrow"
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
            if len(batch) >= DATASET_BATCH_ROWS:
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
