"""Vectorised validation of Arrow input (parquet, saved datasets, Hub datasets) onto the data contract.

The same rules as :func:`lmmixup_hf.data.schema.normalize_record` (the per-row reader JSONL keeps),
with the same quarantine fields, reasons and row numbers, but computed with ``pyarrow.compute`` on a
whole batch: no Python object per row except for the rows that fail and for ids derived from a
hash of prompt+completion. Columns outside the contract (``rating`` structs, ``embedding`` lists,
...) pass through as Arrow, untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmmixup_hf.data.schema import (
    _CONSUMED,
    BASE_COLUMNS,
    COMPLETION,
    COMPLETION_KEYS,
    EXTRA,
    ID,
    PROMPT,
    PROMPT_KEYS,
    SOURCE,
    TASK_TYPE,
    RowError,
    _from_messages,
    make_id,
    normalize_task_type,
)

# (row index in the batch, field, reason) for each rejected row
Reject = tuple[int, str | None, str]


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _py_name(col: pa.ChunkedArray | pa.Array, mask: np.ndarray) -> str:
    """The Python type name of the first selected value (what the per-row reader reports)."""
    value = col.take(pa.array(np.flatnonzero(mask)[:1])).to_pylist()[0]
    return type(value).__name__


def _valid(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return np.asarray(pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False), dtype=bool)


def _one(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one array (no copy when it already is one chunk)."""
    if isinstance(col, pa.Array):
        return col
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _text(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A text column as one ``string`` array (non-text values become null)."""
    arr = _one(col)
    if not _is_text(arr.type):
        return pa.nulls(len(arr), pa.string())
    return arr if pa.types.is_string(arr.type) else arr.cast(pa.string())


class _Errors:
    """The first error of each row, in the order the per-row reader checks them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bad = np.zeros(n, dtype=bool)
        self.at: dict[int, tuple[str | None, str]] = {}

    def add_one(self, i: int, name: str | None, reason: str) -> None:
        if not self.bad[i]:
            self.at[i] = (name, reason)
            self.bad[i] = True

    def add(self, mask: np.ndarray, name: str | None, reason: str | Callable[[int], str]) -> None:
        new = mask & ~self.bad
        for i in np.flatnonzero(new):
            self.at[int(i)] = (name, reason(int(i)) if callable(reason) else reason)
        self.bad |= new


def _texts_from_messages(table: pa.Table, errors: _Errors) -> tuple[pa.Array, pa.Array]:
    """Chat ``messages``: the per-row rule on that one column (it is nested and rare in parquet)."""
    prompts: list[str | None] = []
    completions: list[str | None] = []
    for i, messages in enumerate(table.column("messages").to_pylist()):
        try:
            p, c = _from_messages(messages)
        except RowError as e:
            errors.add_one(i, e.field, e.reason)
            p = c = None
        prompts.append(p)
        completions.append(c)
    return pa.array(prompts, pa.string()), pa.array(completions, pa.string())


def _pick(table: pa.Table, keys: tuple[str, ...]) -> tuple[pa.Array, np.ndarray]:
    """The first present (non-null) of ``keys`` per row, as text (null where that value is not
    text), and which key (index into ``keys``, -1 = none) each row used."""
    chosen = np.full(table.num_rows, -1)
    for j, key in enumerate(keys):
        chosen[(chosen == -1) & _valid(table, key)] = j
    texts = [_text(table.column(k)) for k in keys if k in table.column_names and _is_text(table.column(k).type)]
    value = pc.coalesce(*texts) if texts else pa.nulls(table.num_rows, pa.string())
    return value, chosen


def validate_table(
    table: pa.Table, *, max_chars: int, default_source: str
) -> tuple[pa.Table, np.ndarray, list[Reject]]:
    """Rows of ``table`` that satisfy the contract, as a table with the contract's columns first
    (``id, prompt, completion, source, task_type``, then ``extra`` as null strings, then every
    other input column as it came), the kept rows' indices into ``table`` and ``(row, field,
    reason)`` for each bad row, in row order. Duplicate ids are not checked here
    (that needs the whole pool; see :class:`DuplicateIds`)."""
    n = table.num_rows
    errors = _Errors(n)
    names = set(table.column_names)
    if "messages" in names and not names & {"prompt", "instruction", "question"}:
        prompt, completion = _texts_from_messages(table, errors)
    else:
        prompt, p_key = _pick(table, PROMPT_KEYS)
        completion, c_key = _pick(table, COMPLETION_KEYS)
        errors.add(p_key == -1, "prompt", "missing (looked for " + ", ".join(PROMPT_KEYS) + ", messages)")
        errors.add(c_key == -1, "completion", "missing (looked for " + ", ".join(COMPLETION_KEYS) + ")")
        for keys, chosen in ((PROMPT_KEYS, p_key), (COMPLETION_KEYS, c_key)):
            for j, key in enumerate(keys):
                mask = chosen == j
                if mask.any() and not _is_text(table.column(key).type):
                    errors.add(mask, key, f"expected a string, got {_py_name(table.column(key), mask)}")
        if "input" in names:  # Alpaca: a non-empty input is appended to the instruction
            col = table.column("input")
            has = _valid(table, "input")
            if _is_text(col.type):
                has &= np.asarray(pc.fill_null(pc.greater(pc.utf8_length(col), 0), False), dtype=bool)
            has &= p_key == PROMPT_KEYS.index("instruction")
            if has.any() and not _is_text(col.type):
                errors.add(has, "input", f"expected a string, got {_py_name(col, has)}")
            elif has.any():
                joined = pc.binary_join_element_wise(prompt, _text(col), "\n\n")
                prompt = pc.if_else(pa.array(has), joined, prompt)

    def blank(arr: pa.Array) -> np.ndarray:  # empty or only whitespace (utf8_is_space: non-empty, all space)
        empty = pc.or_(pc.equal(pc.utf8_length(arr), 0), pc.utf8_is_space(arr))
        return np.asarray(pc.fill_null(empty, False), dtype=bool)

    errors.add(blank(prompt), "prompt", "empty")
    errors.add(blank(completion), "completion", "empty")
    total = np.asarray(pc.fill_null(pc.add(pc.utf8_length(prompt), pc.utf8_length(completion)), 0), dtype=np.int64)
    errors.add(total > max_chars, "prompt+completion", lambda i: f"too long ({total[i]} > {max_chars} chars)")

    ids = _ids(table, prompt, completion, errors)
    source = _source(table, default_source, errors)
    task_type = _task_types(table, errors)

    rejects = [(i, *errors.at[i]) for i in sorted(errors.at)]
    keep = np.flatnonzero(~errors.bad)
    rest = sorted(c for c in table.column_names if c not in _CONSUMED and c not in (*BASE_COLUMNS, EXTRA))
    out = pa.table(
        {
            ID: ids,
            PROMPT: prompt,
            COMPLETION: completion,
            SOURCE: source,
            TASK_TYPE: task_type,
            EXTRA: _extra(table),
        }
    )
    for c in rest:
        out = out.append_column(table.schema.field(c), table.column(c))
    if len(keep) < n:
        out = out.take(pa.array(keep))
    return out, keep, rejects


def _extra(table: pa.Table) -> pa.Array:
    """An input's own ``extra`` column (e.g. a stage output read as a plain file) is kept, as text."""
    if EXTRA not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    col = _one(table.column(EXTRA))
    if _is_text(col.type) or pa.types.is_null(col.type):
        return _text(col)
    return pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())


def _ids(table: pa.Table, prompt: pa.Array, completion: pa.Array, errors: _Errors) -> pa.Array:
    """The ``id`` column as text; absent or empty ids are derived from the content (hashing is the
    one per-row step, on the rows that need it)."""
    n = table.num_rows
    if ID in table.column_names:
        col = _one(table.column(ID))
        t = col.type
        present = _valid(table, ID)
        if _is_text(t):
            ids = col.cast(pa.string())
            present &= np.asarray(pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False), dtype=bool)
        elif pa.types.is_integer(t):
            ids = col.cast(pa.string())
        else:
            if present.any():
                errors.add(present, ID, f"expected a string or integer, got {_py_name(col, present)}")
            ids = pa.nulls(n, pa.string())
            present = np.zeros(n, dtype=bool)
    else:
        ids, present = pa.nulls(n, pa.string()), np.zeros(n, dtype=bool)
    derive = np.flatnonzero(~present & ~errors.bad)
    if len(derive):
        where = pa.array(derive)
        made = [make_id(p, c) for p, c in zip(prompt.take(where).to_pylist(), completion.take(where).to_pylist())]
        mask = np.zeros(n, dtype=bool)
        mask[derive] = True
        filled = np.empty(n, dtype=object)
        filled[derive] = made
        ids = pc.if_else(pa.array(mask), pa.array(filled, pa.string()), ids)
    return ids


def _source(table: pa.Table, default_source: str, errors: _Errors) -> pa.Array:
    n = table.num_rows
    if SOURCE not in table.column_names:
        return pa.array(np.full(n, default_source, dtype=object), pa.string())
    col = _one(table.column(SOURCE))
    if not _is_text(col.type) and not pa.types.is_null(col.type):
        present = _valid(table, SOURCE)
        if present.any():
            errors.add(present, SOURCE, f"expected a string, got {_py_name(col, present)}")
        return pa.array(np.full(n, default_source, dtype=object), pa.string())
    return pc.fill_null(_text(col), default_source)


def _task_types(table: pa.Table, errors: _Errors) -> pa.Array:
    """Normalised once per distinct value (a handful), then mapped back onto the rows."""
    n = table.num_rows
    if TASK_TYPE not in table.column_names:
        return pa.array(np.full(n, normalize_task_type(None), dtype=object), pa.string())
    col = _one(table.column(TASK_TYPE))
    codes = col.dictionary_encode()
    values = codes.dictionary.to_pylist()
    mapped: list[str | None] = []
    for v in values:
        try:
            mapped.append(normalize_task_type(v))
        except ValueError as e:
            mapped.append(None)
            idx = np.asarray(pc.fill_null(codes.indices, -1), dtype=np.int64)
            errors.add(idx == len(mapped) - 1, TASK_TYPE, str(e))
    out = pa.array(mapped, pa.string()).take(codes.indices)
    return pc.fill_null(out, normalize_task_type(None))


class DuplicateIds:
    """First occurrence wins across a stream of batches: later rows with a seen id are rejected
    with the line of the first. Kept ids live in one Arrow array (about 20 bytes a row)."""

    def __init__(self) -> None:
        self._seen = pa.array([], pa.string())
        self._seen_lines = np.zeros(0, dtype=np.int64)

    def check(self, ids: pa.Array, lines: np.ndarray) -> tuple[np.ndarray, list[tuple[int, str, int]]]:
        """Which rows are first occurrences, and ``(row, id, first line)`` for each duplicate."""
        ids = _one(ids)
        codes = np.asarray(ids.dictionary_encode().indices, dtype=np.int64)
        _, first_pos = np.unique(codes, return_index=True)  # dictionary codes are in order of appearance
        first_in_batch = first_pos[codes]
        earlier = np.asarray(pc.fill_null(pc.index_in(ids, value_set=self._seen), -1), dtype=np.int64)
        dup = (earlier >= 0) | (first_in_batch != np.arange(len(ids)))
        seen_lines = np.append(self._seen_lines, 0)  # index -1 (not seen) reads the padding
        first_line = np.where(earlier >= 0, seen_lines[earlier], lines[first_in_batch])
        new = ~dup
        if new.any():
            self._seen = pa.concat_arrays([self._seen, ids.filter(pa.array(new))])
            self._seen_lines = np.concatenate([self._seen_lines, lines[new]])
        id_list = ids.filter(pa.array(dup)).to_pylist() if dup.any() else []
        dups = [(int(i), rid, int(first_line[i])) for i, rid in zip(np.flatnonzero(dup), id_list)]
        return new, dups


def iter_validated(
    batches: Iterator[pa.Table | pa.RecordBatch],
    *,
    max_chars: int,
    default_source: str,
    reject: Callable[[int, str | None, str, dict[str, Any]], None],
) -> Iterator[pa.Table]:
    """Validate a stream of batches (rows numbered from 1 across the stream); yield the good rows.
    ``reject(line, field, reason, raw_row)`` gets every bad row, duplicates included, in order."""
    dups = DuplicateIds()
    start = 0
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        good, keep, bad = validate_table(table, max_chars=max_chars, default_source=default_source)
        lines = start + 1 + keep
        new, dup_rows = dups.check(good.column(ID), lines)
        bad += [(int(keep[j]), ID, f"duplicate id {rid!r} (first seen at line {first})") for j, rid, first in dup_rows]
        if bad:
            bad.sort(key=lambda b: b[0])
            raws = table.take(pa.array([b[0] for b in bad])).to_pylist()
            for (i, f, r), raw in zip(bad, raws):
                reject(start + 1 + i, f, r, raw)
        start += table.num_rows
        yield good.filter(pa.array(new)) if not new.all() else good
