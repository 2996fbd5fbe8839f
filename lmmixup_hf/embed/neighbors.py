"""Top-k neighbours over L2-normalised embeddings (inner product = cosine).

Exact search is a blocked torch matmul + topk: memory is bounded by ``query_block x key_block``
scores and never holds an N x N matrix. For very large N, faiss IVF or HNSW (when installed)
serve the same API.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from lmmixup_hf.data.schema import LmmixupError

logger = logging.getLogger(__name__)

Backend = Literal["exact", "ivf", "hnsw", "auto"]
AUTO_ANN_THRESHOLD = 500_000


def resolve_device(device: str | None) -> str:
    """The torch device for kNN and k-means: ``None`` means cuda when available, else cpu (mps is
    left out: its float32 matmul and topk are not faster here). A device torch cannot use is an error."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise LmmixupError(f"device {device!r} is not available here ({str(e).splitlines()[0]})") from None
    return device


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
        return _exact(queries, keys, k, exclude_self, query_block, key_block, resolve_device(device))
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


# -- ANN that checks itself ---------------------------------------------------------------------
MIN_RECALL = 0.95
MAX_SCORE_ERROR = 0.01  # on the mean cosine distance to the k neighbours (the long-tail score)
AUTO_MIN_KEYS = 50_000  # below this, exact search is as fast as ANN (measured in docs/benchmarks.md)


@dataclass
class AnnCheck:
    """What a self-checked kNN search did, for the stage's manifest."""

    backend: str  # the backend that produced the result: exact, ivf or hnsw
    requested: str
    recall: float | None = None  # recall@k of the ANN on the sampled queries against exact search
    max_score_error: float | None = None  # max |mean cosine distance, ANN - exact| on the sample
    sample: int = 0
    effort: int | None = None  # nprobe (ivf) or efSearch (hnsw) after tuning
    nlist: int | None = None
    seconds_exact_estimate: float | None = None
    seconds_ann_estimate: float | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def checked_knn(
    queries: np.ndarray,
    keys: np.ndarray | None = None,
    k: int = 16,
    *,
    backend: Backend = "exact",
    min_recall: float = MIN_RECALL,
    max_error: float = MAX_SCORE_ERROR,
    sample: int = 1000,
    seed: int = 0,
    device: str | None = None,
    exact: Callable[[], tuple[np.ndarray, np.ndarray | None]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, AnnCheck]:
    """:func:`knn` that measures its own recall when it uses an ANN index.

    ``ivf`` / ``hnsw``: the search effort (IVF ``nprobe``, HNSW ``efSearch``) starts low and doubles
    until, on ``sample`` random queries against exact search, the recall@k reaches ``min_recall`` and
    the largest error of the mean cosine distance to the k neighbours is at most ``max_error``; or the
    effort is exhausted, or (from ``AUTO_MIN_KEYS`` keys) the ANN's estimated time passes twice the
    exact search's. The recall and score error found are reported either way.
    ``auto``: exact below ``AUTO_MIN_KEYS`` keys or without faiss; otherwise it times exact search on
    the sample, tunes IVF as above, and uses IVF only when it meets both targets and its estimated
    time (build + search) is below exact's. ``exact`` replaces the full exact search (e.g.
    the symmetric self-search of the long-tail score, which returns no ids).
    """

    def full_exact() -> tuple[np.ndarray, np.ndarray | None]:
        return exact() if exact is not None else knn(queries, None if self_search else keys, k, device=device)

    self_search = keys is None
    keys = queries if keys is None else keys
    n = queries.shape[0]
    k_eff = min(k, keys.shape[0] - (1 if self_search else 0))
    if backend == "exact" or k_eff <= 0 or n == 0:
        return (*full_exact(), AnnCheck("exact", backend))
    if backend == "auto" and (keys.shape[0] < AUTO_MIN_KEYS or not _has_faiss()):
        why = "no faiss" if keys.shape[0] >= AUTO_MIN_KEYS else f"fewer than {AUTO_MIN_KEYS:,} rows"
        return (*full_exact(), AnnCheck("exact", backend, reason=why))
    kind = "ivf" if backend == "auto" else backend
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(n, min(sample, n), replace=False))
    t = time.perf_counter()
    ex_s, ex_i = _exact_for(queries, keys, q, k_eff, self_search, device)
    t_exact = (time.perf_counter() - t) * n / len(q) * (0.5 if self_search else 1.0)  # self-search is symmetric
    t = time.perf_counter()
    index = build_ann(keys, kind)
    t_build = time.perf_counter() - t
    check = AnnCheck(kind, backend, sample=len(q), nlist=getattr(index, "nlist", None))
    effort, limit = (8, index.nlist) if kind == "ivf" else (32, 1024)  # up to an exhaustive IVF scan
    while True:
        effort = set_effort(index, kind, effort)
        t = time.perf_counter()
        s, i = ann_search(index, kind, queries[q], k_eff + (1 if self_search else 0), False)
        if self_search:
            s, i = _drop_rows(s, i, q, k_eff)
        t_ann = t_build + (time.perf_counter() - t) * n / len(q)
        recall = float(np.mean([len(np.intersect1d(a, b)) / k_eff for a, b in zip(i, ex_i)]))
        error = float(np.abs((1 - s.astype(np.float64)).mean(1) - (1 - ex_s.astype(np.float64)).mean(1)).max())
        # past twice exact's time (at a scale where the estimates mean something) ANN has lost its point
        too_slow = keys.shape[0] >= AUTO_MIN_KEYS and t_ann > 2 * t_exact
        good = recall >= min_recall and error <= max_error
        if good or effort >= limit or too_slow:
            break
        effort *= 2
    check.recall, check.max_score_error, check.effort = recall, error, effort
    check.seconds_exact_estimate, check.seconds_ann_estimate = t_exact, t_ann
    if backend == "auto" and (not good or t_ann >= t_exact):
        check.backend = "exact"
        check.reason = f"ivf recall {recall:.3f}, score error {error:.3f}" if not good else "ivf not faster"
        return (*full_exact(), check)
    if not good:
        logger.warning(
            "kNN %s: recall@%d %.3f (target %.2f), max score error %.4f (target %.3f) on %d sampled queries",
            *(kind, k_eff, recall, min_recall, error, max_error, len(q)),
        )
    sims, ids = ann_search(index, kind, queries, k_eff, self_search)
    return sims, ids, check


def _exact_for(
    queries: np.ndarray, keys: np.ndarray, q: np.ndarray, k: int, self_search: bool, device: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the sampled queries ``q`` (own row excluded in a self-search)."""
    if not self_search:
        return knn(queries[q], keys, k, device=device)
    s, i = knn(queries[q], keys, k + 1, device=device)
    return _drop_rows(s, i, q, k)


def _drop_rows(s: np.ndarray, i: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    own = i == rows[:, None]
    drop = np.where(own.any(1), own.argmax(1), i.shape[1] - 1)
    keep = np.ones_like(i, dtype=bool)
    keep[np.arange(len(rows)), drop] = False
    return s[keep].reshape(len(rows), -1)[:, :k], i[keep].reshape(len(rows), -1)[:, :k]
