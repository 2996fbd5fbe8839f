"""Arrow plumbing shared by the pool reader and the stage folders: batch sizes, a process-private
scratch folder, and memory-mapped ``Dataset`` objects over streamed tables.

Kept apart from :mod:`lmmixup_hf.data.io` (reading pools) and :mod:`lmmixup_hf.data.stage_io`
(stage folders) because both stream through it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset

DATASET_BATCH_ROWS = 10_000  # rows per table when a Dataset is streamed
BATCH_BYTES = 64 << 20  # a streamed batch: about this much Arrow data
ROW_GROUP_ROWS = 128 * 1024  # a written row group: at most this many rows ...
ROW_GROUP_BYTES = 128 << 20  # ... or about this many bytes, whichever comes first


def batch_rows(nbytes: int, nrows: int) -> int:
    """Rows per batch so that a batch holds about :data:`BATCH_BYTES`."""
    per_row = max(1, nbytes // max(1, nrows))
    return int(min(ROW_GROUP_ROWS, max(1_024, BATCH_BYTES // per_row)))


def dataset_batches(ds: Dataset, rows: int = DATASET_BATCH_ROWS) -> Iterator[pa.Table]:
    """A dataset's rows as Arrow tables of ``rows`` rows (its indices mapping applied)."""
    for start in range(0, len(ds), rows):
        yield ds.with_format("arrow")[start : start + rows]


def column_values(ds: Dataset, name: str) -> np.ndarray:
    """One column of a dataset as a numpy array (strings as objects), read as Arrow in one go:
    iterating ``ds[name]`` builds a Python row per value."""
    if not len(ds):
        return np.asarray([], dtype=object)
    column = ds.select_columns([name]).with_format("arrow")[: len(ds)].column(name)
    return column.to_numpy(zero_copy_only=False)


def materialise(tables: Iterable[pa.Table], empty: pa.Schema | None = None) -> Dataset:
    """Stream tables into a scratch Arrow file and memory-map it as a ``Dataset`` (``empty``: the
    schema to use when there are no tables at all)."""
    out_path = scratch_dir() / f"pool-{uuid.uuid4().hex}.arrow"
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


_SCRATCH: Path | None = None


def scratch_dir() -> Path:
    """A process-private folder for the Arrow files that datasets memory-map, removed at exit; the
    folders of processes that died before their exit handler ran (SIGKILL, OOM) go on the next use."""
    global _SCRATCH
    if _SCRATCH is None:
        _sweep_scratch(Path(tempfile.gettempdir()))
        _SCRATCH = Path(tempfile.mkdtemp(prefix=f"lmmixup-{os.getpid()}-"))
        (_SCRATCH / _OWNER).write_text(socket.gethostname())
        atexit.register(shutil.rmtree, _SCRATCH, True)
    return _SCRATCH


_OWNER = ".owner"


def _sweep_scratch(root: Path) -> None:
    """Remove ``lmmixup-<pid>-*`` scratch folders whose process is gone: only this host's (the owner
    file names it), and only when no process has that pid."""
    host = socket.gethostname()
    for folder in root.glob("lmmixup-*-*"):
        pid, owner = folder.name.split("-")[1], folder / _OWNER
        try:
            if not pid.isdigit() or owner.read_text() != host:
                continue
            os.kill(int(pid), 0)  # raises when there is no such process
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # no owner file (not ours), or a live process of another user
            continue


def arrow_dataset(table: pa.Table) -> Dataset:
    """A ``Dataset`` over an in-memory Arrow table, with a fresh fingerprint: ``datasets`` would
    otherwise hash every byte of the table to make one (seconds for a large table)."""
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table), fingerprint=uuid.uuid4().hex)
