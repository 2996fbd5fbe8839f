"""Top-k neighbours over L2-normalised embeddings (inner product = cosine).

Exact search is a blocked torch matmul + topk: memory is bounded by ``query_block x key_block``
scores and never holds an N x N matrix. For very large N, faiss IVF or HNSW (when installed)
serve the same API.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from lmmixup_hf.data.schema import LmmixupError

Backend = Literal["exact", "ivf", "hnsw", "auto"]
AUTO_ANN_THRESHOLD = 500_000


def _as_tensor(x: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def knn(
    queries: np.ndarray,
    keys: np.ndarray | None = None,
    k: int = 16,
    *,
    exclude_self: bool | None = None,
    backend: Backend = "exact",
    query_block: int = 1024,
    key_block: int = 32768,
    device: str | None = None,
    nprobe: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(similarities, indices)``, each ``(n_queries, k)``, best first.

    With ``keys=None`` the queries search themselves and, by default, each row's own index is
    excluded. ``k`` is capped by the number of available neighbours.
    """
    self_search = keys is None
    keys = queries if keys is None else keys
    exclude_self = self_search if exclude_self is None else exclude_self
    if exclude_self and not self_search and queries.shape[0] != keys.shape[0]:
        raise ValueError("exclude_self needs queries and keys to be the same rows")
    n_avail = keys.shape[0] - (1 if exclude_self else 0)
    k = min(k, n_avail)
    if k <= 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    if backend == "auto":
        backend = "ivf" if keys.shape[0] >= AUTO_ANN_THRESHOLD and _has_faiss() else "exact"
    if backend == "exact":
        return _exact(queries, keys, k, exclude_self, query_block, key_block, device or "cpu")
    if backend in ("ivf", "hnsw"):
        return _faiss(queries, keys, k, exclude_self, backend, nprobe)
    raise ValueError(f"unknown kNN backend {backend!r}; use exact, ivf, hnsw or auto")


def _exact(
    queries: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool, qb: int, kb: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    n, m = queries.shape[0], keys.shape[0]
    out_s = np.empty((n, k), np.float32)
    out_i = np.empty((n, k), np.int64)
    key_blocks = [(j, _as_tensor(keys[j : j + kb], device)) for j in range(0, m, kb)]
    with torch.inference_mode():
        for i in range(0, n, qb):
            q = _as_tensor(queries[i : i + qb], device)
            best_s = torch.full((q.shape[0], k), -math.inf, device=device)
            best_i = torch.zeros((q.shape[0], k), dtype=torch.long, device=device)
            for j, kt in key_blocks:
                s = _block_scores(q, kt)
                if exclude_self and j < i + q.shape[0] and i < j + kt.shape[0]:
                    rows = torch.arange(q.shape[0], device=device)
                    cols = rows + i - j
                    ok = (cols >= 0) & (cols < kt.shape[0])
                    s[rows[ok], cols[ok]] = -math.inf
                kk = min(k, s.shape[1])
                bs, bi = torch.topk(s, kk, dim=1)
                cat_s = torch.cat([best_s, bs], dim=1)
                cat_i = torch.cat([best_i, bi + j], dim=1)
                best_s, pos = torch.topk(cat_s, k, dim=1)
                best_i = torch.gather(cat_i, 1, pos)
            out_s[i : i + q.shape[0]] = best_s.cpu().numpy()
            out_i[i : i + q.shape[0]] = best_i.cpu().numpy()
    return out_s, out_i


def _block_scores(q: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
    """The only place scores are materialised: one ``query_block x key_block`` matrix at a time."""
    return q @ kt.T


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss(
    queries: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool, kind: str, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        import faiss
    except ImportError:
        raise LmmixupError(f"kNN backend {kind!r} needs faiss: pip install 'lmmixup-hf[faiss]'") from None
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    d = keys.shape[1]
    if kind == "hnsw":
        # L2 graph on unit vectors (|a - b|^2 = 2 - 2 cos): HNSW is built for a true metric, and
        # faiss's inner-product HNSW misses neighbours far more often
        index = faiss.IndexHNSWFlat(d, 32)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = max(64, 2 * k)
    else:
        nlist = max(1, min(int(4 * math.sqrt(keys.shape[0])), keys.shape[0] // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = keys[rng.choice(keys.shape[0], min(keys.shape[0], nlist * 256), replace=False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    index.add(keys)
    extra = 1 if exclude_self else 0
    sims, idx = index.search(queries, k + extra)
    if kind == "hnsw":
        sims = 1.0 - sims / 2.0
    if exclude_self:
        own = idx == np.arange(queries.shape[0])[:, None]
        # drop the own index where it was found, else the last (weakest) neighbour
        drop = np.where(own.any(1), own.argmax(1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(idx.shape[0]), drop] = False
        sims = sims[keep].reshape(-1, k)
        idx = idx[keep].reshape(-1, k)
    return sims.astype(np.float32), idx.astype(np.int64)
