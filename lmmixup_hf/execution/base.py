"""The executor protocol and the local executor (this process; imports no Ray).

A stage's row-parallel work is a *batch function*: ``pa.Table -> pa.Table`` (or a generator of
tables, to hand back results as they finish), picklable, built by a factory once per worker (so a
worker loads its model once and keeps it). The stage owns the function; an executor only decides
where it runs:

- :meth:`Executor.map_batches`: the rows in blocks of a part's batch size (or ``rows_per_call``,
  e.g. one block descriptor per call, see :mod:`lmmixup_hf.execution.blocks`), each block through
  one worker's function; result blocks come back as they finish (in no particular order on Ray;
  the function carries whatever key the stage needs to put results back).
- :meth:`Executor.map_groups`: one call per distinct value of a key column, the group's rows whole.
- :meth:`Executor.share`: a large read-only object every worker reads (``handle.get()``) instead
  of every batch carrying it.

A *part* (:class:`Part`) names a piece of a stage's work with its default batch size; the user's
pool options for that part (``ray: {<part>: {actors, num_cpus, num_gpus, batch_size}}``) say how
much of a cluster it may use. Stages declare their parts in the stage registry; nothing here lists
them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc

from lmmixup_hf.options import Options

BatchFn = Callable[[pa.Table], "pa.Table | Iterator[pa.Table]"]  # a generator streams partial results
BatchFactory = Callable[[], BatchFn]


@dataclass(frozen=True)
class Part:
    """A row-parallel piece of a stage: its name (the key of its pool options) and rows per call."""

    name: str
    batch_size: int = 64
    local_batch_size: int | None = None  # rows per call in this process (None: ``batch_size``)


@dataclass
class PoolOptions(Options):
    """One part's share of a cluster: how many workers, what each asks for, rows per call."""

    actors: int = field(default=2, metadata={"range": "[1, inf)"})
    num_cpus: float = field(default=1.0, metadata={"range": "[0, inf)"})
    num_gpus: float = field(default=0.0, metadata={"range": "[0, inf)"})
    batch_size: int | None = field(default=None, metadata={"range": "[1, inf)"})  # default: the part's


@runtime_checkable
class Shared(Protocol):
    """A read-only object every worker can read."""

    def get(self) -> Any: ...


@runtime_checkable
class Executor(Protocol):
    """Where a stage's batch functions run (see the module docstring)."""

    name: str
    in_process: bool  # True: the functions run in this process (a process-wide model can be reused)
    stage: str | None  # the stage it serves (``for_stage``), which picks that stage's parts

    def for_stage(self, stage: str) -> Executor: ...

    def batch_size(self, part: Part) -> int: ...

    def map_batches(
        self, make_fn: BatchFactory, table: pa.Table, part: Part, rows_per_call: int | None = None
    ) -> Iterator[pa.Table]: ...

    def map_groups(self, fn: BatchFn, table: pa.Table, key: str, part: Part) -> Iterator[pa.Table]: ...

    def share(self, obj: Any) -> Shared: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Local:
    """A shared object in this process: the object itself."""

    obj: Any

    def get(self) -> Any:
        return self.obj


def vector_column(x: Any) -> pa.Array:
    """A 2-D float32 array as an Arrow fixed-size-list column (one vector per row, no copy per row)."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1] if x.ndim == 2 else 0)


def vectors(column: pa.ChunkedArray | pa.Array) -> Any:
    """A :func:`vector_column` back as an ``(n, d)`` float32 array."""
    import numpy as np

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(len(arr), d)


def results(out: pa.Table | Iterator[pa.Table]) -> Iterator[pa.Table]:
    """A batch function's output as tables: the one it returned, or each one it yielded."""
    if isinstance(out, pa.Table):
        yield out
    else:
        yield from out


def blocks(table: pa.Table, size: int) -> list[pa.Table]:
    """``table`` in consecutive blocks of ``size`` rows (zero-copy slices)."""
    return [table.slice(i, size) for i in range(0, table.num_rows, max(1, size))]


def groups(table: pa.Table, key: str) -> Iterator[pa.Table]:
    """The rows of each distinct ``key`` value, in sorted key order, each group in its input order."""
    values = table[key]
    for value in sorted(pc.unique(values).to_pylist(), key=str):
        yield table.filter(pc.equal(values, value))


class LocalExecutor:
    """Runs batch functions here, one block after another, with one function per ``map_batches``."""

    name = "local"
    in_process = True

    def __init__(self, pools: Mapping[str, PoolOptions] | None = None, stage: str | None = None):
        self.pools = dict(pools or {})
        self.stage = stage

    def for_stage(self, stage: str) -> LocalExecutor:
        return LocalExecutor(self.pools, stage)

    def batch_size(self, part: Part) -> int:
        pool = self.pools.get(part.name)
        return (pool.batch_size if pool else None) or part.local_batch_size or part.batch_size

    def map_batches(
        self, make_fn: BatchFactory, table: pa.Table, part: Part, rows_per_call: int | None = None
    ) -> Iterator[pa.Table]:
        if table.num_rows == 0:
            return
        fn = make_fn()
        for block in blocks(table, rows_per_call or self.batch_size(part)):
            yield from results(fn(block))

    def map_groups(self, fn: BatchFn, table: pa.Table, key: str, part: Part) -> Iterator[pa.Table]:
        for group in groups(table, key):
            yield from results(fn(group))

    def share(self, obj: Any) -> Shared:
        return Local(obj)

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}

    def close(self) -> None:
        pass
