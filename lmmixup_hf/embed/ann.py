"""faiss ANN indexes (IVF-Flat, HNSW) over L2-normalised keys; faiss is an optional extra."""

from __future__ import annotations

import math

import numpy as np

from lmmixup_hf.data.schema import LmmixupError


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss(
    queries: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool, kind: str, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    index = build_ann(keys, kind)
    set_effort(index, kind, nprobe if kind == "ivf" else max(64, 2 * k))
    return ann_search(index, kind, queries, k, exclude_self)


def build_ann(keys: np.ndarray, kind: str):
    """A faiss index over L2-normalised ``keys``: IVF-Flat (inner product; ``nlist`` = 4 sqrt(N),
    trained on up to 64 rows per list, at least 39) or HNSW32 (L2 on unit vectors: |a - b|^2 = 2 - 2 cos)."""
    try:
        import faiss
    except ImportError:
        raise LmmixupError(f"kNN backend {kind!r} needs faiss: pip install 'lmmixup-hf[faiss]'") from None
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    d = keys.shape[1]
    if kind == "hnsw":
        # faiss's inner-product HNSW misses neighbours far more often than the L2 graph
        index = faiss.IndexHNSWFlat(d, 32)
        index.hnsw.efConstruction = 80
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(keys.shape[0])), keys.shape[0] // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(keys[rng.choice(keys.shape[0], min(keys.shape[0], nlist * 64), replace=False)])
    else:
        raise ValueError(f"unknown ANN kind {kind!r}; use ivf or hnsw")
    index.add(keys)
    return index


def set_effort(index, kind: str, effort: int) -> int:
    """Search effort: ``nprobe`` lists for IVF (capped at nlist), ``efSearch`` for HNSW."""
    if kind == "ivf":
        index.nprobe = effort = max(1, min(effort, index.nlist))
    else:
        index.hnsw.efSearch = effort
    return effort


def ann_search(index, kind: str, queries: np.ndarray, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(sims, ids)`` best first from a :func:`build_ann` index; with ``exclude_self`` the queries
    are the indexed rows and each drops its own id (or, if not found, its weakest neighbour)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    extra = 1 if exclude_self else 0
    sims, idx = index.search(queries, k + extra)
    if kind == "hnsw":
        sims = 1.0 - sims / 2.0
    if exclude_self:
        own = idx == np.arange(queries.shape[0])[:, None]
        drop = np.where(own.any(1), own.argmax(1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(idx.shape[0]), drop] = False
        sims = sims[keep].reshape(-1, k)
        idx = idx[keep].reshape(-1, k)
    return sims.astype(np.float32), idx.astype(np.int64)
