"""``lmmixup cluster``: cluster the low-quality rows, one source at a time, for the distiller to fuse.

Reads a rated pool or stage folder, keeps the rows under the quality threshold (the one rule of
:mod:`lmmixup_hf.data.quality`), embeds them once (or reuses an ``embedding`` column), runs the
core (:func:`lmmixup_hf.stages.cluster.cluster_rows`) and writes ``data/`` (rows with
``cluster_id``), ``clusters/`` (one row per cluster), ``leftovers/`` and ``cluster_sizes.png``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import Dataset

from lmmixup_hf.data.io import read_pool
from lmmixup_hf.data.quality import high_quality_mask, rating_scores
from lmmixup_hf.data.schema import HIGH_QUALITY_THRESHOLD, RATING, LmmixupError
from lmmixup_hf.execution.base import Executor, LocalExecutor
from lmmixup_hf.models.registry import DEFAULT_EMBEDDING_MODEL
from lmmixup_hf.pipeline.registry import stage
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.plotting import figure
from lmmixup_hf.stages.cluster import ClusterOptions, cluster_rows
from lmmixup_hf.stages.cluster_groups import sources_on

logger = logging.getLogger(__name__)


HISTOGRAM = "cluster_sizes.png"


# -- the stage ------------------------------------------------------------------------------------
@dataclass
class ClusterArgs(ClusterOptions):
    """The clustering options (:class:`~lmmixup_hf.stages.cluster.ClusterOptions`) and the stage's own."""

    input: str = field(
        kw_only=True, metadata={"help": "Rated pool or stage folder (any input `lmmixup ingest` reads)."}
    )
    out: str = field(
        kw_only=True, metadata={"help": "Output folder: data/, clusters/, leftovers/, cluster_sizes.png."}
    )
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "Sentence-transformers model."})
    batch_size: int = field(
        default=64, metadata={"help": "Embedding batch size.", "range": "[1, inf)", "fingerprint": False}
    )
    quality: Literal["low", "all"] = field(
        default="low",
        metadata={"help": "Rows to cluster: `low` (score under --threshold; unrated rows are skipped) or `all`."},
    )
    threshold: int = field(
        default=HIGH_QUALITY_THRESHOLD,
        metadata={"help": "High quality means score (0-5) >= this (as in rate/split).", "range": "[0, 5]"},
    )


def save_histogram(sizes: np.ndarray, path: str | Path, title: str = "cluster sizes") -> None:
    with figure(path, (6, 3.5)) as (fig, ax):
        if len(sizes):
            ax.hist(sizes, bins=np.arange(sizes.min(), sizes.max() + 2) - 0.5, edgecolor="black")
        ax.set_xlabel("cluster size")
        ax.set_ylabel("clusters")
        ax.set_title(title)


def cluster(args: ClusterArgs, executor: Executor | None = None) -> Dataset:
    """``lmmixup cluster``: read, pick the low-quality rows, embed (or reuse an ``embedding``
    column), run :func:`~lmmixup_hf.stages.cluster.cluster_rows`, write the folder. ``executor``
    runs the embedding and each source's clustering (default: here)."""
    from lmmixup_hf.embed.embeddings import embedder_on, row_embeddings

    run = StageRun("cluster", args.out, inputs=[args.input], params=args)
    if run.is_complete():
        logger.info("cluster: up to date, skipping (%s)", args.out)
        return run.load()
    pool = read_pool(args.input, quarantine=run.quarantine)
    ds, skipped = select_rows(pool, args.quality, args.threshold)
    if len(ds) == 0:
        raise LmmixupError(f"{args.input}: no rows to cluster (quality={args.quality!r}, {skipped})")
    executor, declared = executor or LocalExecutor(), stage("cluster")
    embed = dict(device=args.device, batch_size=args.batch_size)
    embedder = embedder_on(executor, declared.part("embed"), args.embedding_model, **embed)
    emb = row_embeddings(ds, args.embedding_model, **embed, embedder=embedder)
    options = ClusterOptions(**{f.name: getattr(args, f.name) for f in fields(ClusterOptions)})
    out = cluster_rows(ds, emb, options, map_sources=sources_on(executor, declared.part("cluster")))
    st = out.stats
    run.out_dir.mkdir(parents=True, exist_ok=True)
    n_clusters = st["multi_row_clusters"]
    title = f"{n_clusters} clusters, {st['clustered']} rows" + (
        f"; {st['leftovers']} rows alone" if st["leftovers"] else ""
    )
    save_histogram(st["sizes"], run.out_dir / HISTOGRAM, title)
    run.finish(
        out.rows,
        counts={
            "rows_in": len(pool) + len(run.quarantine),
            "selected": len(ds),
            "clustered": st["clustered"],
            "leftovers": st["leftovers"],
            "clusters": st["clusters"],
            "distilled_alone": st["distilled_alone"],
            **skipped,
        },
        extra={
            "mean_cohesion": st["mean_cohesion"],
            "sizes": args.sizes,
            "size_histogram": st["size_histogram"],
            "sources": st["sources"],
            "histogram": HISTOGRAM,
            "executor": executor.name,
        },
        splits={"clusters": out.clusters, "leftovers": out.leftovers},
    )
    logger.info(
        "cluster: %d clusters of >= %d rows, mean cohesion %.4f, %d leftovers",
        n_clusters,
        args.min_size,
        st["mean_cohesion"],
        st["leftovers"],
    )
    return out.rows


def select_rows(ds: Dataset, quality: str, threshold: int = HIGH_QUALITY_THRESHOLD) -> tuple[Dataset, dict[str, int]]:
    """``quality: low``: the rows under the configured threshold (the one quality rule); unrated rows
    are skipped and counted. ``all``: every row."""
    if quality == "all":
        return ds, {}
    if RATING not in ds.column_names:
        logger.info("cluster: no ratings, clustering every row")
        return ds, {}
    scores = rating_scores(ds)
    low = ~np.isnan(scores) & ~high_quality_mask(scores, threshold)
    n_unrated = int(np.isnan(scores).sum())
    return ds.select(np.flatnonzero(low)), {
        "skipped_high": len(ds) - int(low.sum()) - n_unrated,
        "skipped_unrated": n_unrated,
    }
