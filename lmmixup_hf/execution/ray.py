"""The Ray executor: batch functions on Ray Data actor pools, results streamed back.

- ``map_batches``: ``ray.data`` ``map_batches`` over an actor pool of the part's size; the factory
  runs once per actor (a judge client, a model, an engine per actor), an actor asks for the part's
  ``num_cpus``/``num_gpus`` (one GPU per actor when configured). A dead actor is restarted and its
  block retried ``max_retries`` times, so a lost worker costs time, never rows.
- ``map_groups``: ``groupby(key).map_groups`` with the function on each group.
- ``share``: ``ray.put`` once; every actor reads the object from the object store.

The driver consumes result blocks as they finish (``iter_batches``) and hands them to the stage,
which checkpoints them: a killed driver loses only the blocks in flight. (With blocks,
:mod:`lmmixup_hf.execution.blocks`, the results are only the workers' completion records.) Ray is imported on first
use only; a private cluster (no ``address``) listens on the loopback address only.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lmmixup_hf.data.schema import LmmixupError, ServiceError
from lmmixup_hf.execution.base import BatchFactory, BatchFn, Part, PoolOptions, Shared, blocks
from lmmixup_hf.options import Options

logger = logging.getLogger(__name__)

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, bound to 127.0.0.1


@dataclass
class RayClusterOptions(Options):
    """The cluster half of the ``ray:`` options; the pool per part is added by whoever knows the parts."""

    address: str | None = None  # a running cluster ("auto", "ray://head:10001"); None: start a private one
    num_cpus: int | None = field(default=None, metadata={"range": "[0, inf)"})  # private cluster only (default: all)
    num_gpus: int | None = field(default=None, metadata={"range": "[0, inf)"})  # private cluster only
    # restarts of a dead actor (and retries of its batch) before the stage fails
    max_retries: int = field(default=3, metadata={"range": "[0, inf)"})

    def pool(self, part: str) -> PoolOptions:
        """The pool options of ``part`` (a part nobody configured gets the defaults)."""
        pool = getattr(self, part, None)
        return pool if isinstance(pool, PoolOptions) else PoolOptions()


def connect(options: RayClusterOptions) -> bool:
    """Join the configured cluster, or start a private one on this machine. True when this call
    started Ray (and so should shut it down)."""
    if not options.address and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ONLY, "0")  # read when Ray is imported
    try:
        import ray
        import ray.data
    except ImportError:
        raise LmmixupError('executor: ray needs Ray Data: pip install "lmmixup-hf[ray]"') from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the stage's own bar counts rows
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
    if options.address:
        kwargs["address"] = options.address
    else:
        kwargs.update(num_cpus=options.num_cpus, num_gpus=options.num_gpus)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = options.address or "a private cluster"
        raise LmmixupError(f"executor: ray: could not start or join {where}: {e}") from None
    logger.info("ray: %s, resources %s", options.address or "private cluster", ray.cluster_resources())
    return True


class Worker:
    """What runs on an actor: the stage's function, built once by its factory."""

    def __init__(self, make_fn: BatchFactory):
        self.fn = make_fn()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.fn(batch)


@dataclass(frozen=True)
class InObjectStore:
    """A shared object in Ray's object store (the reference is wrapped so Ray does not resolve it
    when the handle is passed to an actor; ``get`` reads it once there)."""

    refs: tuple

    def get(self) -> Any:
        import ray

        return ray.get(self.refs[0])


class RayExecutor:
    """Runs batch functions on Ray Data (see the module docstring)."""

    name = "ray"
    in_process = False

    def __init__(self, options: RayClusterOptions, stage: str | None = None, shared: dict | None = None):
        self.options = options
        self.stage = stage
        self._state = shared if shared is not None else {"started": None}

    def for_stage(self, stage: str) -> RayExecutor:
        return RayExecutor(self.options, stage, self._state)

    def start(self) -> Any:
        """Join or start the cluster (once, on first use: a run whose stages are all up to date
        never starts Ray); returns the ``ray`` module."""
        if self._state["started"] is None:
            self._state["started"] = connect(self.options)
        import ray

        return ray

    def close(self) -> None:
        if self._state.get("started"):
            import ray

            ray.shutdown()
        self._state["started"] = None

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "address": self.options.address or "private cluster"}

    def batch_size(self, part: Part) -> int:
        return self.options.pool(part.name).batch_size or part.batch_size

    def map_batches(
        self, make_fn: BatchFactory, table: pa.Table, part: Part, rows_per_call: int | None = None
    ) -> Iterator[pa.Table]:
        if table.num_rows == 0:
            return
        ray = self.start()
        pool = self.options.pool(part.name)
        parts = blocks(table, rows_per_call or self.batch_size(part))
        mapped = ray.data.from_arrow(parts).map_batches(
            Worker,
            fn_constructor_kwargs={"make_fn": make_fn},
            batch_size=None,  # a block is one call
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(pool.actors, len(parts))),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            # a block that kills every actor it meets fails the stage (what finished is checkpointed)
            max_restarts=self.options.max_retries,
            max_task_retries=self.options.max_retries,
        )
        yield from self._results(ray, mapped, part)

    def map_groups(self, fn: BatchFn, table: pa.Table, key: str, part: Part) -> Iterator[pa.Table]:
        if table.num_rows == 0:
            return
        ray = self.start()
        pool = self.options.pool(part.name)
        grouped = (
            ray.data.from_arrow(table)
            .groupby(key)
            .map_groups(fn, batch_format="pyarrow", num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None)
        )
        yield from self._results(ray, grouped, part)

    def share(self, obj: Any) -> Shared:
        return InObjectStore((self.start().put(obj),))

    def _results(self, ray: Any, ds: Any, part: Part) -> Iterator[pa.Table]:
        try:
            yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
        except ray.exceptions.RayError as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise ServiceError(
                f"{self.stage or part.name} on Ray: a batch failed after {self.options.max_retries} retries "
                f"({type(e).__name__}: {first}); what finished is kept, rerun to resume"
            ) from e
