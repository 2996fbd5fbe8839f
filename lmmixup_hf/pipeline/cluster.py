"""``lmmixup cluster``: cluster the low-quality rows, one source at a time, for the distiller to fuse.

Reads a rated pool or stage folder, keeps the rows under the quality threshold (the one rule of
:mod:`lmmixup_hf.data.quality`), embeds them once (or reuses an ``embedding`` column), runs the
core (:func:`lmmixup_hf.stages.cluster.cluster_rows`) and writes ``data/`` (rows with
``cluster_id``), ``clusters/`` (one row per cluster), ``leftovers/`` and ``cluster_sizes.png``."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset

from lmmixup_hf.data.io import read_pool
from lmmixup_hf.data.quality import high_quality_mask, rating_scores
from lmmixup_hf.data.schema import HIGH_QUALITY_THRESHOLD, RATING, LmmixupError
from lmmixup_hf.models.registry import DEFAULT_EMBEDDING_MODEL
from lmmixup_hf.pipeline.executors import Executor
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.plotting import figure
from lmmixup_hf.stages.cluster import CLUSTER_DEFAULTS, CLUSTER_OPTIONS, cluster_rows

logger = logging.getLogger(__name__)


HISTOGRAM = "cluster_sizes.png"


# -- the stage ------------------------------------------------------------------------------------
@dataclass
class ClusterArgs:
    input: str = field(metadata={"help": "Rated pool or stage folder (any input `lmmixup ingest` reads)."})
    out: str = field(metadata={"help": "Output folder: data/, clusters/, leftovers/, cluster_sizes.png."})
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "Sentence-transformers model."})
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device for the embedding model (default: cuda > mps > cpu) and for k-means / kNN (cuda > cpu)."
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Embedding batch size."})
    quality: str = field(
        default="low",
        metadata={"help": "Rows to cluster: `low` (score under --threshold; unrated rows are skipped) or `all`."},
    )
    threshold: int = field(
        default=HIGH_QUALITY_THRESHOLD, metadata={"help": "High quality means score (0-5) >= this (as in rate/split)."}
    )
    sizes: str = field(
        default=CLUSTER_DEFAULTS["sizes"],
        metadata={
            "help": "`data`: sizes follow the data (merge while the mean pairwise cosine stays >= min_cohesion; "
            "rows with no close neighbours are distilled alone); `drawn`: the method's sizes drawn from "
            "Normal(mean_cap, std_cap), every row placed."
        },
    )
    min_size: int = field(default=CLUSTER_DEFAULTS["min_size"], metadata={"help": "Smallest cluster."})
    max_size: int = field(default=CLUSTER_DEFAULTS["max_size"], metadata={"help": "Largest cluster."})
    mean_cap: float = field(
        default=CLUSTER_DEFAULTS["mean_cap"],
        metadata={"help": "Mean cluster size: the drawn sizes' Normal, or the data sizes' prior."},
    )
    std_cap: float = field(
        default=CLUSTER_DEFAULTS["std_cap"], metadata={"help": "Std of the drawn sizes / of the data sizes' prior."}
    )
    min_cohesion: float = field(
        default=CLUSTER_DEFAULTS["min_cohesion"],
        metadata={"help": "data: every cluster's mean pairwise cosine is at least this."},
    )
    size_prior: float = field(
        default=CLUSTER_DEFAULTS["size_prior"],
        metadata={"help": "data: extra mean cosine a cluster needs per std_cap above mean_cap (0 = no prior)."},
    )
    seed: int = field(default=CLUSTER_DEFAULTS["seed"], metadata={"help": "Seed for sizes and k-means."})
    sim_floor: float | None = field(
        default=CLUSTER_DEFAULTS["sim_floor"],
        metadata={"help": "drawn: minimum cosine to a cluster centre; points below go to leftovers/."},
    )
    n_candidates: int = field(
        default=CLUSTER_DEFAULTS["n_candidates"], metadata={"help": "drawn: candidate centres per point (top-m)."}
    )
    cell_size: int = field(default=CLUSTER_DEFAULTS["cell_size"], metadata={"help": "Points per coarse k-means cell."})
    kmeans_iters: int = field(
        default=CLUSTER_DEFAULTS["kmeans_iters"], metadata={"help": "k-means iterations per level."}
    )
    balance_iters: int = field(
        default=CLUSTER_DEFAULTS["balance_iters"],
        metadata={"help": "drawn: balanced k-means steps (centres := member means, reassign; 0 = off)."},
    )
    refine_rounds: int = field(
        default=CLUSTER_DEFAULTS["refine_rounds"], metadata={"help": "drawn: size-preserving swap rounds (0 = off)."}
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
    from lmmixup_hf.embed.embeddings import row_embeddings

    run = StageRun("cluster", args.out, inputs=[args.input], params=asdict(args))
    if run.is_complete():
        logger.info("cluster: up to date, skipping (%s)", args.out)
        return run.load()
    pool = read_pool(args.input, quarantine=run.quarantine)
    ds, skipped = select_rows(pool, args.quality, args.threshold)
    if len(ds) == 0:
        raise LmmixupError(f"{args.input}: no rows to cluster (quality={args.quality!r}, {skipped})")
    executor = executor or Executor()
    embed = dict(device=args.device, batch_size=args.batch_size)
    emb = row_embeddings(ds, args.embedding_model, **embed, embedder=executor.embedder(args.embedding_model, **embed))
    options = {k: getattr(args, k) for k in CLUSTER_OPTIONS}
    out = cluster_rows(ds, emb, map_sources=executor.map_sources, **options)
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
    if quality != "low":
        raise LmmixupError(f"--quality must be `low` or `all`, got {quality!r}")
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
