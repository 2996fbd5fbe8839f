"""The Ray executor: a stage's parallel work on Ray Data, results streamed back to the driver.

Each part runs the way Ray Data is meant to be used:

- rate / rerate, embed, distill: ``map_batches`` over an actor pool. The judge (client or local
  model), the embedding model and the distill engine are built once per actor; actors ask for
  ``num_gpus`` when configured, so one actor holds one GPU.
- cluster: ``groupby("source").map_groups`` with the clustering core on each source.
- longtail: the keys go into the object store once and every actor reads them from there; queries
  go in batches. The min-max over all scores stays on the driver (a reduction over the results).

The driver consumes results as they finish (``iter_batches``) and hands them to the stage command,
which appends them to its checkpoints: a killed driver loses only the batches in flight. Ray
restarts a dead actor and retries its batch, so a lost worker costs time, never rows.

A private cluster (no ``address``) listens on the loopback address only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from datasets import Dataset
from tqdm.auto import tqdm

from lmmixup_hf.data.schema import CLUSTER_ID, ID, LmmixupError, ServiceError
from lmmixup_hf.embed.embeddings import Embedder
from lmmixup_hf.pipeline.executors import Executor, OnChunk, OnRating, RayOptions

if TYPE_CHECKING:
    from lmmixup_hf.distiller.engines import Engine
    from lmmixup_hf.judge.protocol import Judge

logger = logging.getLogger(__name__)

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, bound to 127.0.0.1


def connect(options: RayOptions) -> bool:
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


def to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(blob).read_all()


def tensor_column(x: np.ndarray) -> pa.Array:
    """A 2-D float32 array as Ray's tensor column (a numpy batch gets it back as ``(n, d)``)."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def usage_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What a batch added to a usage meter: counters as differences, the rest (model, price) as is."""
    return {k: v - before.get(k, 0) if _counter(v) else v for k, v in after.items()}


def add_usage(total: dict[str, Any], delta: Mapping[str, Any]) -> None:
    for k, v in delta.items():
        total[k] = total.get(k, 0) + v if _counter(v) else v


def _counter(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# -- what runs on the actors (module-level classes: workers import them by name) -----------------
class JudgeActor:
    """One judge per actor; a batch of items in, one rating per item out."""

    def __init__(self, make_judge: Callable[[], Judge]):
        self.judge = make_judge()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from lmmixup_hf.judge.judges import JudgeItem

        cols = batch.to_pydict()
        items = [JudgeItem(*fields) for fields in zip(cols["text"], cols["kind"], cols["reference"], cols["style"])]
        before = self.judge.usage.as_dict()
        ratings = self.judge.rate_many(items, show_progress=False)
        usage = json.dumps(usage_delta(before, self.judge.usage.as_dict()))
        self.judge.flush()  # an actor may be stopped at any time after its batch is returned
        return pa.table(
            {
                "pos": cols["pos"],
                "rating": [json.dumps(r.as_struct()) if r.ok else None for r in ratings],
                "error": [None if r.ok else (r.error or "no score in the reply") for r in ratings],
                "judge": [r.judge for r in ratings],
                "usage": [usage] + [None] * (len(ratings) - 1),
            }
        )


class DistillActor:
    """One engine per actor; a chunk of clusters in, its records out (as the local loop makes them)."""

    def __init__(self, make_engine: Callable[[], Engine], generation: Mapping[str, Any]):
        self.engine = make_engine()
        self.generation = dict(generation)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from datasets.table import InMemoryTable

        from lmmixup_hf.stages.distill import SCHEMA, distill_chunk, group_clusters

        out: dict[str, list] = {"k": [], "part": [], "seconds": [], "engine": []}
        for k, blob in zip(batch["k"].to_pylist(), batch["members"].to_pylist()):
            members = Dataset(InMemoryTable(from_ipc(blob)))
            ids = np.asarray([str(x) for x in members[ID]])
            clusters = list(group_clusters(np.asarray(members[CLUSTER_ID], dtype=np.int64), ids))
            t0 = time.time()
            rows = distill_chunk(members, clusters, self.engine, **self.generation)
            out["k"].append(k)
            out["part"].append(to_ipc(pa.Table.from_pylist(rows, schema=SCHEMA)))
            out["seconds"].append(time.time() - t0)
            out["engine"].append(json.dumps(self.engine.describe(), default=str))
        self.engine.flush()  # as the judge's: the actor may be stopped after this batch
        return pa.table(out)


class EmbedActor:
    """One embedding model per actor (no cache there: the driver keeps the one cache)."""

    def __init__(self, model_id: str, device: str | None, batch_size: int):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per actor in the driver's log is noise
        self.embedder = Embedder(model_id, device=device, batch_size=batch_size, cache=False, show_progress=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"key": batch["key"], "vector": self.embedder.encode_uncached([str(t) for t in batch["text"]])}


class KnnActor:
    """Exact top-k similarities of a batch of queries against keys every actor shares."""

    def __init__(self, keys: list, k: int, self_search: bool, device: str | None):
        import ray

        self.keys = ray.get(keys[0])  # from the object store, once per actor, shared read-only
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # we only read
        self.k, self.self_search, self.device = k, self_search, device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lmmixup_hf.embed.neighbors import knn

        rows, queries = batch["row"], batch["query"]
        if not self.self_search:
            return {"row": rows, "sims": knn(queries, self.keys, self.k, exclude_self=False, device=self.device)[0]}
        k = min(self.k, self.keys.shape[0] - 1)
        sims, idx = knn(queries, self.keys, k + 1, exclude_self=False, device=self.device)
        keep = idx != rows[:, None]  # drop the row itself, else the (k+1)-th
        keep[keep.all(1), -1] = False
        return {"row": rows, "sims": sims[keep].reshape(len(rows), k)}


def cluster_group(batch: dict[str, np.ndarray], options: Any) -> dict[str, np.ndarray]:
    """One source's rows (all of them: a ``map_groups`` group), clustered in their input order
    (``options``: a :class:`~lmmixup_hf.stages.cluster.ClusterOptions`)."""
    from lmmixup_hf.stages.cluster import cluster_subset

    order = np.argsort(batch["row"])
    res = cluster_subset(np.asarray(batch["embedding"], np.float32)[order], options)
    n = len(order)
    return {
        "row": batch["row"][order],
        "source": batch["source"][order],
        "label": res.labels,
        "rounds": np.full(n, res.rounds),
        "swaps": np.full(n, res.swaps),
    }


# -- the executor ----------------------------------------------------------------------------------
class RayExecutor(Executor):
    """Runs each stage's parallel part on Ray Data (see the module docstring)."""

    name = "ray"

    def __init__(self, options: RayOptions, stage: str | None = None, shared: dict | None = None):
        self.options = options
        self.stage = stage
        self._shared = shared if shared is not None else {"started": None}

    def for_stage(self, stage: str) -> RayExecutor:
        return RayExecutor(self.options, stage, self._shared)

    def start(self):
        """Join or start the cluster (once, on first use: a run whose stages are all up to date
        never starts Ray); returns the ``ray`` module."""
        if self._shared["started"] is None:
            self._shared["started"] = connect(self.options)
        import ray

        return ray

    def close(self) -> None:
        if self._shared.get("started"):
            import ray

            ray.shutdown()
        self._shared["started"] = None

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "address": self.options.address or "private cluster"}

    def map_blocks(
        self,
        part: str,
        blocks: Sequence[pa.Table],
        actor: type,
        constructor: Mapping[str, Any],
        batch_format: str = "pyarrow",
    ) -> Iterator[Any]:
        """``map_batches`` of ``blocks`` (one block per call) over the part's actor pool; results as
        they finish, in no particular order."""
        ray = self.start()
        pool = self.options.pool(part)
        ds = ray.data.from_arrow(list(blocks))
        mapped = ds.map_batches(
            actor,
            fn_constructor_kwargs=dict(constructor),
            batch_size=None,  # a block is one call
            batch_format=batch_format,
            compute=ray.data.ActorPoolStrategy(size=min(pool.actors, max(1, len(blocks)))),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            # a dead actor is restarted and its batch retried, a bounded number of times: a batch that
            # kills every actor it meets fails the stage (what finished is in the checkpoints)
            max_restarts=self.options.max_retries,
            max_task_retries=self.options.max_retries,
        )
        try:
            yield from mapped.iter_batches(batch_size=None, batch_format=batch_format)
        except ray.exceptions.RayError as e:
            raise ServiceError(
                f"{self.stage or part} on Ray: a batch failed after {self.options.max_retries} retries "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); what finished is kept, "
                "rerun to resume"
            ) from e

    def split(self, part: str, table: pa.Table) -> list[pa.Table]:
        """``table`` in blocks of the part's batch size: one block is one actor call."""
        size = self.options.batch_size(part)
        return [table.slice(i, size) for i in range(0, table.num_rows, size)]

    # -- rate -------------------------------------------------------------------------------------
    def rate(
        self,
        make_judge: Callable[[], Judge],
        items: Sequence[Any],
        on_result: OnRating,
        *,
        show_progress: bool = True,
    ) -> dict[str, Any]:
        from lmmixup_hf.judge.judges import Rating

        part = self.stage if self.stage in ("rate", "rerate") else "rate"
        table = pa.table(
            {
                "pos": np.arange(len(items), dtype=np.int64),
                "text": [it.text for it in items],
                "kind": [it.kind for it in items],
                "reference": [it.reference for it in items],
                "style": [it.style for it in items],
            }
        )
        usage: dict[str, Any] = {}
        with tqdm(total=len(items), desc=f"{part} (ray)", unit="row", disable=not show_progress) as bar:
            for out in self.map_blocks(part, self.split(part, table), JudgeActor, {"make_judge": make_judge}):
                for pos, rating, error, judge, used in zip(*(out[c].to_pylist() for c in out.column_names)):
                    r = (
                        Rating.from_struct(json.loads(rating))
                        if rating
                        else Rating(None, None, judge=judge, error=error)
                    )
                    on_result(pos, r)
                    if used:
                        add_usage(usage, json.loads(used))
                bar.update(out.num_rows)
        if "cost_usd" in usage:
            usage["cost_usd"] = round(usage["cost_usd"], 6)
        return {**usage, "executor": "ray"}

    # -- distill ----------------------------------------------------------------------------------
    def distill(
        self,
        make_engine: Callable[[], Engine],
        members: Dataset,
        chunks: Sequence[Sequence[tuple[int, Any]]],
        todo: Sequence[int],
        generation: Mapping[str, Any],
        on_chunk: OnChunk,
    ) -> dict[str, Any]:
        """Every chunk travels whole (its members as Arrow) so each actor distils exactly the chunk
        the local loop would: the same engine batches, the same outputs."""
        if not todo:
            return {}
        rows = []
        for k in todo:
            idx = np.concatenate([np.asarray(i) for _, i in chunks[k]])
            cids = np.concatenate([np.full(len(i), c, np.int64) for c, i in chunks[k]])
            sub = members.with_format("arrow")[idx.tolist()].append_column(CLUSTER_ID, pa.array(cids))
            rows.append({"k": k, "members": to_ipc(sub)})
        table = pa.Table.from_pylist(rows, schema=pa.schema([("k", pa.int64()), ("members", pa.binary())]))
        constructor = {"make_engine": make_engine, "generation": dict(generation)}
        engine: dict[str, Any] = {}
        for out in self.map_blocks("distill", self.split("distill", table), DistillActor, constructor):
            for k, blob, seconds, described in zip(*(out[c].to_pylist() for c in ("k", "part", "seconds", "engine"))):
                on_chunk(k, from_ipc(blob).to_pylist(), seconds)
                engine = engine or json.loads(described)
        return {**engine, "executor": "ray"}

    # -- embed ------------------------------------------------------------------------------------
    def embedder(self, model_id: str, *, device: str | None, batch_size: int) -> Embedder:
        return RayEmbedder(self, model_id, device=device, batch_size=batch_size)

    # -- cluster ----------------------------------------------------------------------------------
    @property
    def map_sources(self) -> Callable[[np.ndarray, np.ndarray, Any], dict[str, Any]]:
        def run(sources: np.ndarray, x: np.ndarray, options: Any) -> dict[str, Any]:
            from lmmixup_hf.stages.cluster import ClusterResult

            ray = self.start()
            pool = self.options.pool("cluster")
            table = pa.table(
                {
                    "row": np.arange(len(sources), dtype=np.int64),
                    "source": [str(s) for s in sources],
                    "embedding": tensor_column(x),
                }
            )
            grouped = (
                ray.data.from_arrow(table)
                .groupby("source")
                .map_groups(
                    cluster_group,
                    fn_kwargs={"options": options},
                    batch_format="numpy",
                    num_cpus=pool.num_cpus,
                    num_gpus=pool.num_gpus or None,
                )
            )
            labels = np.full(len(sources), -1, np.int64)
            stats: dict[str, tuple[int, int]] = {}
            for b in grouped.iter_batches(batch_size=None, batch_format="numpy"):
                labels[b["row"]] = b["label"]
                for src, rounds, swaps in zip(b["source"], b["rounds"], b["swaps"]):
                    stats[str(src)] = (int(rounds), int(swaps))
            out = {}
            for src, (rounds, swaps) in stats.items():
                out[src] = ClusterResult(labels[sources == src], np.zeros(0, np.int64), swaps=swaps, rounds=rounds)
            return out

        return run

    # -- longtail ---------------------------------------------------------------------------------
    @property
    def knn_search(self) -> Callable[[np.ndarray, np.ndarray | None, int], np.ndarray]:
        def search(queries: np.ndarray, keys: np.ndarray | None, k: int) -> np.ndarray:
            ray = self.start()
            self_search = keys is None
            shared = ray.put(np.ascontiguousarray(queries if self_search else keys, dtype=np.float32))
            table = pa.table({"row": np.arange(len(queries), dtype=np.int64), "query": tensor_column(queries)})
            k_eff = min(k, (len(queries) - 1) if self_search else len(keys))
            sims = np.zeros((len(queries), max(k_eff, 0)), np.float32)
            if k_eff <= 0 or len(queries) == 0:
                return sims
            constructor = {"keys": [shared], "k": k_eff, "self_search": self_search, "device": None}
            for b in self.map_blocks("longtail", self.split("longtail", table), KnnActor, constructor, "numpy"):
                sims[b["row"]] = b["sims"]
            return sims

        return search


class RayEmbedder(Embedder):
    """The usual embedder (same cache, same vectors) whose cache misses are encoded on Ray actors;
    the driver writes each finished batch into the cache, so a rerun re-encodes nothing done."""

    def __init__(self, executor: RayExecutor, model_id: str, **kwargs: Any):
        super().__init__(model_id, **kwargs)
        self.executor = executor

    def encode_missing(self, missing: list[tuple[str, str]], found: dict[str, np.ndarray], desc: str) -> None:
        table = pa.table({"key": [k for k, _ in missing], "text": [t for _, t in missing]})
        constructor = {"model_id": self.model_id, "device": self.device, "batch_size": self.batch_size}
        blocks = self.executor.split("embed", table)
        with tqdm(total=len(missing), desc=f"{desc} (ray)", unit="text", disable=not self.show_progress) as bar:
            for b in self.executor.map_blocks("embed", blocks, EmbedActor, constructor, "numpy"):
                self.store([str(k) for k in b["key"]], np.asarray(b["vector"], np.float32), found)
                self.n_encoded += len(b["key"])
                bar.update(len(b["key"]))
