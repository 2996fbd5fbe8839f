"""The cluster stage's row-parallel part: one source's rows clustered on their own, as a batch
function over Arrow (``map_groups`` by source on any executor).

:func:`sources_on` gives :func:`~lmmixup_hf.stages.cluster.cluster_rows` its ``map_sources``: every
source's rows go through :func:`cluster_group`, here or on a cluster's workers, and the labels
come back in input order.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from lmmixup_hf.execution.base import Executor, Part, vector_column, vectors
from lmmixup_hf.stages.cluster import ClusterOptions, ClusterResult, SourceMapper, cluster_subset


def cluster_group(group: pa.Table, options: ClusterOptions) -> pa.Table:
    """One source's rows (``row``, ``source``, ``embedding``; all of them), clustered in their input
    order: per row its ``label``, and the source's merge ``rounds``/``swaps``."""
    order = np.argsort(group["row"].to_numpy())
    res = cluster_subset(vectors(group["embedding"])[order], options)
    n = len(order)
    return pa.table(
        {
            "row": group["row"].take(pa.array(order)),
            "source": group["source"].take(pa.array(order)),
            "label": pa.array(np.asarray(res.labels, np.int64)),
            "rounds": pa.array(np.full(n, res.rounds, np.int64)),
            "swaps": pa.array(np.full(n, res.swaps, np.int64)),
        }
    )


def sources_on(executor: Executor, part: Part) -> SourceMapper:
    """``map_sources`` for ``cluster_rows``: :func:`cluster_group` per source on ``executor``."""

    def run(sources: np.ndarray, x: np.ndarray, options: Any) -> dict[str, ClusterResult]:
        table = pa.table(
            {
                "row": pa.array(np.arange(len(sources), dtype=np.int64)),
                "source": pa.array([str(s) for s in sources], pa.string()),
                "embedding": vector_column(x),
            }
        )
        labels = np.full(len(sources), -1, np.int64)
        stats: dict[str, tuple[int, int]] = {}
        for out in executor.map_groups(partial(cluster_group, options=options), table, "source", part):
            labels[out["row"].to_numpy()] = out["label"].to_numpy()
            for src, rounds, swaps in zip(*(out[c].to_pylist() for c in ("source", "rounds", "swaps"))):
                stats[src] = (rounds, swaps)
        return {
            src: ClusterResult(labels[sources == src], np.zeros(0, np.int64), swaps=swaps, rounds=rounds)
            for src, (rounds, swaps) in stats.items()
        }

    return run
