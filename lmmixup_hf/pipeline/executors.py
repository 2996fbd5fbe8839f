"""Where a stage's parallel work runs: in this process (``local``) or on a Ray cluster (``ray``).

A stage command keeps its files, checkpoints and manifest. What it hands to its executor is the
work that can run in parallel: judging rows, distilling chunks of clusters, embedding texts,
clustering each source, the long-tail kNN search. :class:`Executor` does that work here, as the
commands always have; :class:`~lmmixup_hf.pipeline.ray_executor.RayExecutor` runs it on Ray Data
and streams the results back, so the command's checkpoints fill in as batches finish and a rerun
after a kill picks up where they stopped. The results are the same rows either way.

>>> executor: ray            # in a pipeline config
>>> ray:
>>>   address: auto          # a running cluster (`ray start --head`); leave out for a private one
>>>   rate: {actors: 8}
>>>   distill: {actors: 2, num_gpus: 1}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from datasets import Dataset

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.options import Options, from_mapping

if TYPE_CHECKING:
    from lmmixup_hf.distiller.engines import Engine
    from lmmixup_hf.embed.embeddings import TextEmbedder
    from lmmixup_hf.judge.protocol import Judge

EXECUTORS = ("local", "ray")

# Stage parts that run on Ray actors, each with its own pool options (`ray: {<part>: {...}}`).
# `embed` covers the embedding done by cluster, longtail and mix.
RAY_PARTS = ("rate", "rerate", "distill", "embed", "cluster", "longtail")

# rows per Ray batch (one batch = one call of an actor); distill counts chunks of clusters
DEFAULT_BATCH = {"rate": 64, "rerate": 64, "embed": 512, "distill": 1, "cluster": 1, "longtail": 2048}

OnRating = Callable[[int, Any], None]  # (position in the items, Rating)
OnChunk = Callable[[int, list[dict[str, Any]], float], None]  # (chunk, records, seconds)


@dataclass
class RayPoolOptions(Options):
    """One part's actor pool: how many actors, what each asks of the cluster, rows per call."""

    actors: int = field(default=2, metadata={"range": "[1, inf)"})
    num_cpus: float = field(default=1.0, metadata={"range": "[0, inf)"})
    num_gpus: float = field(default=0.0, metadata={"range": "[0, inf)"})
    batch_size: int | None = field(default=None, metadata={"range": "[1, inf)"})  # default: DEFAULT_BATCH[part]


def _pool() -> Any:
    return field(default_factory=RayPoolOptions)


@dataclass
class RayOptions(Options):
    """The ``ray:`` section of a pipeline config: the cluster, then one pool per part (RAY_PARTS)."""

    address: str | None = None  # a running cluster ("auto", "ray://head:10001"); None: start a private one
    num_cpus: int | None = field(default=None, metadata={"range": "[0, inf)"})  # private cluster only (default: all)
    num_gpus: int | None = field(default=None, metadata={"range": "[0, inf)"})  # private cluster only
    # restarts of a dead actor (and retries of its batch) before the stage fails
    max_retries: int = field(default=3, metadata={"range": "[0, inf)"})
    rate: RayPoolOptions = _pool()
    rerate: RayPoolOptions = _pool()
    distill: RayPoolOptions = _pool()
    embed: RayPoolOptions = _pool()  # the embedding done by cluster, longtail and mix
    cluster: RayPoolOptions = _pool()
    longtail: RayPoolOptions = _pool()

    def pool(self, part: str) -> RayPoolOptions:
        return getattr(self, part) if part in RAY_PARTS else RayPoolOptions()

    def batch_size(self, part: str) -> int:
        return self.pool(part).batch_size or DEFAULT_BATCH.get(part, 64)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | None, where: str = "ray") -> RayOptions:
        """A ``ray:`` mapping, checked like every options section (errors name ``where.key``)."""
        return from_mapping(cls, dict(raw or {}), f"{where}.")


class Executor:
    """Runs a stage's parallel work in this process, one piece after another."""

    name = "local"

    def for_stage(self, stage: str) -> Executor:
        """The executor as one stage sees it (a Ray executor picks that stage's pool options)."""
        return self

    def rate(
        self,
        make_judge: Callable[[], Judge],
        items: Sequence[Any],
        on_result: OnRating,
        *,
        show_progress: bool = True,
    ) -> dict[str, Any]:
        """Rate ``items`` (JudgeItems) with one judge from ``make_judge``; ``on_result(position, rating)``
        as each finishes. Returns the judge's usage (requests, tokens, cost)."""
        judge = make_judge()
        judge.rate_many(items, on_result=on_result, desc="rate", show_progress=show_progress)
        return judge.usage.as_dict()

    def distill(
        self,
        make_engine: Callable[[], Engine],
        members: Dataset,
        chunks: Sequence[Sequence[tuple[int, Any]]],
        todo: Sequence[int],
        generation: Mapping[str, Any],
        on_chunk: OnChunk,
    ) -> dict[str, Any]:
        """Distil the chunks ``todo`` (each a list of ``(cluster_id, member indices)``); ``on_chunk``
        as each finishes. Returns the engine's description."""
        from lmmixup_hf.stages.distill import distill_chunk

        engine = make_engine()
        for k in todo:
            t0 = time.time()
            rows = distill_chunk(members, chunks[k], engine, **generation)
            on_chunk(k, rows, time.time() - t0)
        return engine.describe()

    def embedder(self, model_id: str, *, device: str | None, batch_size: int) -> TextEmbedder | None:
        """The embedder for a stage's rows; None means the process-wide one (``get_embedder``)."""
        return None

    @property
    def map_sources(self) -> Callable | None:
        """How ``cluster_rows`` clusters the sources; None: here, one after the other."""
        return None

    @property
    def knn_search(self) -> Callable | None:
        """The long-tail stage's exact kNN search; None: here (``neighbors.knn``)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}

    def close(self) -> None:
        pass


def make_executor(name: str = "local", ray: Mapping[str, Any] | RayOptions | None = None) -> Executor:
    """``local`` (the default, needs nothing) or ``ray`` (needs ``pip install "lmmixup-hf[ray]"``)."""
    if name == "local":
        return Executor()
    if name == "ray":
        from lmmixup_hf.pipeline.ray_executor import RayExecutor

        options = ray if isinstance(ray, RayOptions) else RayOptions.from_config(ray)
        return RayExecutor(options)
    raise LmmixupError(f"executor: {name!r}: expected one of {', '.join(EXECUTORS)}")
