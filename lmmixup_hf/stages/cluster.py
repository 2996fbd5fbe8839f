"""The cluster core: the low-quality rows, one source at a time, grouped for the distiller to fuse.

Two ways to size the clusters (``sizes``):

- ``data`` (default): sizes follow the data. A size-capped average-linkage clustering over an
  approximate kNN graph (:func:`data_cluster`): clusters merge while their mean pairwise cosine stays
  at or above ``min_cohesion`` and their size within ``max_size``; ``mean_cap``/``std_cap`` act as a
  prior (a cluster larger than usual needs a little more cohesion). Rows left in a cluster below
  ``min_size`` have no close neighbours: the stage makes each a one-row cluster that the distiller
  rewrites alone, so every row still reaches the distiller and none is forced into unrelated company.
- ``drawn``: the method's sizes. Capacities drawn from a rounded Normal(mean_cap, std_cap), clipped to
  [min_size, max_size] and summing to N, so geometry only decides membership
  (:func:`capacity_cluster`):

  1. centres by a two-level spherical k-means (coarse cells, then ``cap``-many centres per cell), so
     k ~ N/3 centres never cost an N x k k-means;
  2. each point's top-m candidate centres by kNN over the centres of its 3 nearest cells (an
     inverted file over the centres); no full ranking of all centres per point;
  3. a greedy capacity assignment in vectorised rounds: every unplaced point proposes to its next
     candidate and each centre keeps its most similar proposals up to its free capacity; points
     whose m candidates are full fall back to a kNN over the centres that still have room;
  4. refinement that raises the mean intra-cluster cosine: balanced k-means steps (centres :=
     member means, then the same capacity assignment) and size-preserving swaps between clusters.

  An optional similarity floor sends points that cannot be placed above it to a reported leftover
  set instead of a far-away cluster.

k-means runs in torch (CPU or GPU), so faiss is not needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from datasets import Dataset

from lmmixup_hf.data.arrow_files import column_values
from lmmixup_hf.data.schema import CLUSTER_ID, ID, SOURCE
from lmmixup_hf.options import resolve
from lmmixup_hf.stages.clustering.common import LEFTOVER, ClusterResult, candidate_centres, cohesion, compact_labels
from lmmixup_hf.stages.clustering.drawn import (
    assign,
    balanced_step,
    capacity_cluster,
    propose_rounds,
    refine_swaps,
    sample_caps,
    two_level_centres,
)
from lmmixup_hf.stages.clustering.linkage import cell_neighbors, data_cluster, size_penalty
from lmmixup_hf.stages.clustering.options import ClusterOptions

__all__ = [
    "LEFTOVER",
    "ClusterOptions",
    "ClusterResult",
    "ClusteredRows",
    "SourceMapper",
    "assign",
    "balanced_step",
    "candidate_centres",
    "capacity_cluster",
    "cell_neighbors",
    "cluster_rows",
    "cluster_sources",
    "cluster_subset",
    "cohesion",
    "compact_labels",
    "data_cluster",
    "propose_rounds",
    "refine_swaps",
    "sample_caps",
    "size_penalty",
    "two_level_centres",
]

logger = logging.getLogger(__name__)


class ClusteredRows(NamedTuple):
    rows: Dataset  # every clustered row with its `cluster_id`, in cluster order
    clusters: Dataset  # one row per cluster: cluster_id, source, size, member_ids, cohesion
    leftovers: Dataset  # rows with no close neighbours (data sizes: also distilled alone, see `rows`)
    stats: dict[str, Any]  # counts, per-source figures, mean cohesion, size histogram


SourceMapper = Callable[[np.ndarray, np.ndarray, ClusterOptions], dict[str, ClusterResult]]


def cluster_sources(sources: np.ndarray, embeddings: np.ndarray, options: ClusterOptions) -> dict[str, ClusterResult]:
    """Each source's rows clustered on their own, one after the other (an executor may run them
    elsewhere, e.g. a Ray ``groupby("source")``)."""
    return {src: cluster_subset(embeddings[sources == src], options) for src in sorted(set(sources.tolist()))}


def cluster_rows(
    ds: Dataset,
    embeddings: np.ndarray,
    options: ClusterOptions | None = None,
    *,
    map_sources: SourceMapper | None = None,
    **changes: Any,
) -> ClusteredRows:
    """The cluster core: each source's rows clustered on their (unit) embeddings; no files.

    With data sizes a row with no close neighbours becomes a one-row cluster of its own (the
    distiller rewrites it alone) and is also listed in ``leftovers``; with drawn sizes and a
    ``sim_floor`` such rows get ``cluster_id = -1`` and are left out of ``rows``.

    Args:
        ds: The rows to cluster (usually the low-quality ones), with ``id`` and ``source``.
        embeddings: ``(len(ds), d)`` L2-normalised vectors, e.g. from ``row_embeddings``.
        options: The clustering options of ``lmmixup cluster`` (:class:`ClusterOptions`; default
            its defaults).
        map_sources: How the sources are clustered (default :func:`cluster_sources`: here, one
            after the other; the Ray executor runs them as groups).
        **changes: Options changed from ``options`` (``sizes``, ``max_size``, ``mean_cap``,
            ``min_cohesion``, ...); a bad one raises ``OptionError``.

    Returns:
        ``ClusteredRows(rows, clusters, leftovers, stats)``: the rows with a ``cluster_id`` in
        cluster order, one row per cluster (members, cohesion), the leftovers and the figures.

    Example:
        >>> import numpy as np
        >>> from datasets import Dataset
        >>> x = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0, 1], [0.14, 0.99], [0.2, 0.98]], np.float32)
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> ds = Dataset.from_dict({"id": list("abcdef"), "source": ["s"] * 6})
        >>> out = cluster_rows(ds, x, max_size=3, mean_cap=3, std_cap=1, min_cohesion=0.9)
        >>> list(out.clusters["member_ids"]), len(out.leftovers)
        ([['a', 'b', 'c'], ['d', 'e', 'f']], 0)
    """
    opts = resolve(ClusterOptions, options, changes)
    sources = column_values(ds, SOURCE).astype(object)
    labels = np.full(len(ds), LEFTOVER, np.int64)
    per_source: dict[str, dict[str, int]] = {}
    next_id = 0
    results = (map_sources or cluster_sources)(sources, embeddings, opts)
    for src in sorted(results):
        idx = np.flatnonzero(sources == src)
        res = results[src]
        local, k = compact_labels(res.labels, next_id)
        labels[idx] = local
        next_id += k
        per_source[src] = {"rows": len(idx), "clusters": k, "leftovers": int((local < 0).sum())}
        per_source[src].update({"merge_rounds": res.rounds} if opts.sizes == "data" else {"swaps": res.swaps})
        logger.info("cluster: %s: %d rows -> %d clusters, %d leftovers", src, len(idx), k, (local < 0).sum())

    n_clusters, n_clustered, alone = next_id, int((labels >= 0).sum()), np.flatnonzero(labels < 0)
    if opts.sizes == "data":  # leftovers are distilled alone: each becomes a one-row cluster after the others
        labels[alone] = next_id + np.arange(len(alone))
        next_id += len(alone)
    coh = cohesion(embeddings, labels, next_id)
    sizes = np.bincount(labels[labels >= 0], minlength=next_id)
    ds = ds.add_column(CLUSTER_ID, labels.tolist())
    placed = np.flatnonzero(labels >= 0)
    rows = ds.select(placed[np.argsort(labels[placed], kind="stable")])
    ids = column_values(ds, ID).astype(object)
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(next_id + 1))
    first_member = order[starts[:-1]] if next_id else np.zeros(0, np.int64)
    table = Dataset.from_dict(
        {
            CLUSTER_ID: list(range(next_id)),
            SOURCE: sources[first_member].tolist(),
            "size": sizes.tolist(),
            "member_ids": [ids[order[starts[c] : starts[c + 1]]].tolist() for c in range(next_id)],
            "cohesion": coh.tolist(),
        }
    )
    assert n_clustered + len(alone) == len(ds), "every row is clustered or a leftover"
    stats = {
        "clustered": n_clustered,
        "leftovers": len(alone),
        "clusters": next_id,  # what the distiller gets, one-row clusters included
        "multi_row_clusters": n_clusters,
        "distilled_alone": len(alone) if opts.sizes == "data" else 0,
        "mean_cohesion": float(np.nanmean(coh[:n_clusters])) if n_clusters else float("nan"),
        "size_histogram": {int(s): int(c) for s, c in zip(*np.unique(sizes[:n_clusters], return_counts=True))},
        "sizes": sizes[:n_clusters],
        "sources": per_source,
    }
    return ClusteredRows(rows, table, ds.select(alone), stats)


def cluster_subset(x: np.ndarray, args: ClusterOptions) -> ClusterResult:
    """One source's rows, clustered with the chosen size mode."""
    sizes = dict(min_size=args.min_size, max_size=args.max_size, mean_cap=args.mean_cap, std_cap=args.std_cap)
    if args.sizes == "data":
        return data_cluster(
            x,
            **sizes,
            min_cohesion=args.min_cohesion,
            size_prior=args.size_prior,
            cell_size=args.cell_size,
            kmeans_iters=args.kmeans_iters,
            seed=args.seed,
            device=args.device,
        )
    return capacity_cluster(
        x,
        **sizes,
        seed=args.seed,
        cell_size=args.cell_size,
        n_candidates=args.n_candidates,
        kmeans_iters=args.kmeans_iters,
        balance_iters=args.balance_iters,
        refine_rounds=args.refine_rounds,
        sim_floor=args.sim_floor,
        device=args.device,
    )
