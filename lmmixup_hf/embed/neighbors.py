"""Top-k neighbours over L2-normalised embeddings (inner product = cosine).

Exact search is a blocked torch matmul + topk: memory is bounded by ``query_block x key_block``
scores and never holds an N x N matrix. For very large N, ``partition`` (k-means cells searched as
BLAS blocks, then one neighbour-descent step; torch only) and faiss IVF or HNSW (when installed)
serve the same API, and :func:`checked_knn` measures their recall against exact search.
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
from lmmixup_hf.embed.kmeans import coarse_cells

logger = logging.getLogger(__name__)

Backend = Literal["exact", "partition", "ivf", "hnsw", "auto"]


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
    excluded. ``k`` is capped by the number of available neighbours. ``nprobe``: the cells (or IVF
    lists) each query searches with ``partition`` / ``ivf``; unchecked here, see :func:`checked_knn`
    (which ``auto`` goes through).
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
    if backend == "auto":  # one rule for `auto`: an ANN only where it measured itself good enough
        if exclude_self != self_search:
            backend = "exact"
        else:
            sims, ids, _ = checked_knn(queries, None if self_search else keys, k, backend="auto", device=device)
            return sims, ids  # type: ignore[return-value]
    if backend == "exact":
        return _exact(queries, keys, k, exclude_self, query_block, key_block, resolve_device(device))
    if backend == "partition":
        part = build_partition(keys, device=device)
        query_ids = np.arange(queries.shape[0]) if exclude_self else None
        sims, ids = partition_search(part, keys, queries, k, nprobe, query_ids=query_ids, device=device)
        return refine_self(queries, sims, ids, device=device) if self_search else (sims, ids)
    if backend in ("ivf", "hnsw"):
        return _faiss(queries, keys, k, exclude_self, backend, nprobe)
    raise ValueError(f"unknown kNN backend {backend!r}; use exact, partition, ivf, hnsw or auto")


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


# -- partitioned exact search (no faiss) ------------------------------------------------------------
@dataclass
class Partition:
    """Keys grouped into spherical k-means cells: ``order[starts[c]:starts[c + 1]]`` are the keys of cell ``c``."""

    centres: torch.Tensor
    order: np.ndarray
    starts: np.ndarray

    @property
    def nlist(self) -> int:
        return int(self.centres.shape[0])


def build_partition(
    keys: np.ndarray, *, cell_size: int | None = None, seed: int = 0, device: str | None = None
) -> Partition:
    """Spherical k-means cells over ``keys``: about sqrt(N) cells of sqrt(N) rows (at least 64),
    trained on a sample of 64 rows per cell; each key in the cell of its nearest centre."""
    n = keys.shape[0]
    cell_size = cell_size or max(64, int(math.sqrt(n)))
    with torch.inference_mode():
        centres, cell = coarse_cells(_as_tensor(keys, resolve_device(device)), cell_size, seed=seed)
    order = np.argsort(cell, kind="stable")
    return Partition(centres, order, np.searchsorted(cell[order], np.arange(centres.shape[0] + 1)))


def partition_search(
    part: Partition,
    keys: np.ndarray,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    *,
    query_ids: np.ndarray | None = None,
    query_block: int = 8192,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query among the keys of its ``nprobe`` nearest cells (what faiss IVF-Flat
    computes), organised by cell: every cell's keys meet all the queries that probe it in one matmul,
    so the work runs as BLAS blocks instead of a per-query list scan. ``query_ids``: the queries are
    these rows of ``keys`` (a self-search), so each drops its own id."""
    device = resolve_device(device)
    nprobe = max(1, min(nprobe, part.nlist))
    extra = 1 if query_ids is not None else 0
    n = queries.shape[0]
    kt, qt = _as_tensor(keys, device), _as_tensor(queries, device)
    centres = part.centres.to(device)
    best_s = torch.full((n, k + extra), -math.inf, device=device)
    best_i = torch.full((n, k + extra), -1, dtype=torch.long, device=device)
    with torch.inference_mode():
        probes = (
            torch.cat([torch.topk(qt[i : i + 8192] @ centres.T, nprobe, dim=1).indices for i in range(0, n, 8192)])
            .cpu()
            .numpy()
        )
        by_cell = np.argsort(probes.ravel(), kind="stable")
        qstarts = np.searchsorted(probes.ravel()[by_cell], np.arange(part.nlist + 1))
        for c in range(part.nlist):
            kids = torch.from_numpy(part.order[part.starts[c] : part.starts[c + 1]]).to(device)
            if len(kids) == 0:
                continue
            kb = kt[kids]
            rows = by_cell[qstarts[c] : qstarts[c + 1]] // nprobe
            for lo in range(0, len(rows), query_block):
                r = torch.from_numpy(rows[lo : lo + query_block]).to(device)
                s, i = torch.topk(qt[r] @ kb.T, min(k + extra, len(kids)), dim=1)
                s, pos = torch.topk(torch.cat([best_s[r], s], 1), k + extra, dim=1)
                best_i[r] = torch.gather(torch.cat([best_i[r], kids[i]], 1), 1, pos)
                best_s[r] = s
    out_s, out_i = best_s.cpu().numpy(), best_i.cpu().numpy()
    if query_ids is not None:
        return _drop_rows(out_s, out_i, query_ids, k)
    return out_s, out_i


def refine_self(
    x: np.ndarray,
    sims: np.ndarray,
    ids: np.ndarray,
    *,
    rounds: int = 2,
    hops: int = 8,
    block: int = 1024,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``rounds`` neighbour-descent steps of a self-kNN (NN-descent's update): each row's candidates
    are its neighbours, its reverse neighbours (rows that found it, up to k) and the first ``hops``
    neighbours of each of its neighbours; new ones are scored exactly and the best k kept. A group
    split across cells is repaired once one member on each side found one on the other; the second
    round spreads what the first found (measured: the worst sampled row's score error at 300k
    planted rows went from 0.04 after one round to 0.0004 after two)."""
    for _ in range(rounds):
        sims, ids = _descent_step(x, sims, ids, hops=hops, block=block, device=device)
    return sims, ids


def _descent_step(
    x: np.ndarray, sims: np.ndarray, ids: np.ndarray, *, hops: int, block: int, device: str | None
) -> tuple[np.ndarray, np.ndarray]:
    n, k = ids.shape
    if n == 0 or k == 0:
        return sims, ids
    device = resolve_device(device)
    reverse = _reverse_neighbours(ids, k)
    x = np.ascontiguousarray(x, dtype=np.float32)
    xt = _as_tensor(x, device)
    out_s, out_i = sims.copy(), ids.copy()
    hops = min(hops, k)
    with torch.inference_mode():
        for lo in range(0, n, block):
            own = ids[lo : lo + block]
            rows = np.arange(lo, lo + len(own))
            nbrs = np.where(own[:, :, None] >= 0, ids[np.maximum(own, 0), :hops], -1).reshape(len(own), -1)
            # sort by (id, not own): a candidate already among the row's neighbours keeps its known
            # similarity and only new, unique candidates are scored
            cand = np.concatenate([own, reverse[lo : lo + block], nbrs], axis=1)
            key = np.sort(2 * cand + (np.arange(cand.shape[1]) >= k), axis=1)
            cand, new = key // 2, (key % 2).astype(bool)
            new &= (cand >= 0) & (cand != rows[:, None])
            new[:, 1:] &= cand[:, 1:] != cand[:, :-1]
            # compact the new candidates to the left: as many columns as the row with the most
            width = max(1, int(new.sum(1).max()))
            col = np.cumsum(new, axis=1) - 1
            fresh = np.full((len(own), width), -1, np.int64)
            fresh[np.nonzero(new)[0], col[new]] = cand[new]
            valid = torch.from_numpy(fresh >= 0).to(device)
            safe = np.maximum(fresh, 0)
            gathered = (
                torch.from_numpy(x[safe]).to(device) if device == "cpu" else xt[torch.from_numpy(safe).to(device)]
            )
            scores = torch.bmm(gathered, xt[lo : lo + len(own), :, None])[:, :, 0].masked_fill_(~valid, -math.inf)
            both_s = torch.cat([torch.from_numpy(sims[lo : lo + block]).to(device), scores], 1)
            s, pos = torch.topk(both_s, k, dim=1)
            out_s[lo : lo + len(own)] = s.cpu().numpy()
            out_i[lo : lo + len(own)] = np.take_along_axis(np.concatenate([own, fresh], 1), pos.cpu().numpy(), 1)
    return out_s, out_i


def _reverse_neighbours(ids: np.ndarray, width: int) -> np.ndarray:
    """``(n, width)``: up to ``width`` rows that have each row among their neighbours, -1 padded."""
    n, k = ids.shape
    src = np.repeat(np.arange(n), k)
    dst = ids.ravel()
    ok = dst >= 0
    src, dst = src[ok], dst[ok]
    order = np.argsort(dst, kind="stable")
    src, dst = src[order], dst[order]
    first = np.searchsorted(dst, np.arange(n))
    rank = np.arange(len(dst)) - first[dst]
    keep = rank < width
    out = np.full((n, width), -1, np.int64)
    out[dst[keep], rank[keep]] = src[keep]
    return out


# -- ANN that checks itself ---------------------------------------------------------------------
MIN_RECALL = 0.95
MAX_SCORE_ERROR = 0.01  # on the mean cosine distance to the k neighbours (the long-tail score)
AUTO_MIN_KEYS = 50_000  # below this, exact search is as fast as ANN (measured in docs/benchmarks.md)


@dataclass
class AnnCheck:
    """What a self-checked kNN search did, for the stage's manifest."""

    backend: str  # the backend that produced the result: exact, partition, ivf or hnsw
    requested: str
    recall: float | None = None  # recall@k of the ANN on the sampled queries against exact search
    max_score_error: float | None = None  # max |mean cosine distance, ANN - exact| on the sample
    mean_score_error: float | None = None
    sample: int = 0
    effort: int | None = None  # cells probed (partition, ivf nprobe) or efSearch (hnsw) after tuning
    nlist: int | None = None
    refined: bool = False  # one neighbour-descent step ran (partition self-search)
    seconds_exact_estimate: float | None = None
    seconds_ann_estimate: float | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


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
    """:func:`knn` that measures its own recall when it uses an approximate search.

    ``sample`` random queries are searched exactly first; the recall@k and the largest error of the
    mean cosine distance to the k neighbours (the long-tail score) are measured on them.

    ``partition`` (no faiss needed): the cells probed per query start at 4 and double until the
    sample reaches ``min_recall`` (and, without the refinement step, ``max_error``); then the full
    search runs, a self-search is refined by one neighbour-descent step (:func:`refine_self`), and
    the sample is measured again on the final result. If that misses a target, the probes double
    and the search reruns, while its estimated time stays under exact's.
    ``ivf`` / ``hnsw`` (faiss): the effort (IVF ``nprobe``, HNSW ``efSearch``) doubles until the
    sample meets both targets, the effort is exhausted, or (from ``AUTO_MIN_KEYS`` keys) the
    estimated time passes twice exact's.
    ``auto``: exact below ``AUTO_MIN_KEYS`` keys; otherwise ``partition``, kept only when the final
    sample meets both targets and the search was estimated faster than exact, else exact.
    The recall and score errors found are reported either way. ``exact`` replaces the full exact
    search (e.g. the symmetric self-search of the long-tail score, which returns no ids).
    """

    def full_exact() -> tuple[np.ndarray, np.ndarray | None]:
        return exact() if exact is not None else knn(queries, None if self_search else keys, k, device=device)

    self_search = keys is None
    keys = queries if keys is None else keys
    n = queries.shape[0]
    k_eff = min(k, keys.shape[0] - (1 if self_search else 0))
    if backend == "exact" or k_eff <= 0 or n == 0:
        return (*full_exact(), AnnCheck("exact", backend))
    if backend == "auto" and keys.shape[0] < AUTO_MIN_KEYS:
        return (*full_exact(), AnnCheck("exact", backend, reason=f"fewer than {AUTO_MIN_KEYS:,} rows"))
    kind = "partition" if backend == "auto" else backend
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(n, min(sample, n), replace=False))
    t = time.perf_counter()
    ex_s, ex_i = _exact_for(queries, keys, q, k_eff, self_search, device)
    t_exact = (time.perf_counter() - t) * n / len(q) * (0.5 if self_search else 1.0)  # self-search is symmetric

    def measure(s: np.ndarray, i: np.ndarray, check: AnnCheck) -> bool:
        check.recall = float(np.mean([len(np.intersect1d(a, b)) / k_eff for a, b in zip(i, ex_i)]))
        err = np.abs((1 - s.astype(np.float64)).mean(1) - (1 - ex_s.astype(np.float64)).mean(1))
        check.max_score_error, check.mean_score_error = float(err.max()), float(err.mean())
        return check.recall >= min_recall and check.max_score_error <= max_error

    # past twice exact's time (at a scale where the estimates mean something) ANN has lost its point;
    # `auto` stops as soon as ANN is not estimated faster than exact
    budget = (t_exact if backend == "auto" else 2 * t_exact) if keys.shape[0] >= AUTO_MIN_KEYS else math.inf
    check = AnnCheck(kind, backend, sample=len(q), seconds_exact_estimate=t_exact)
    args = (queries, keys, q, k_eff, self_search, check, measure, budget)
    if kind == "partition":
        sims, ids, good = _checked_partition(*args, min_recall, backend != "auto", device)
    else:
        sims, ids, good = _checked_faiss(*args, kind)
    if backend == "auto" and (sims is None or not good):
        check.backend = "exact"
        check.reason = f"{kind} recall {check.recall:.3f}, score error {check.max_score_error:.3f}"
        if check.recall >= min_recall and check.max_score_error <= max_error:
            check.reason = f"{kind} not faster"
        return (*full_exact(), check)
    if not good:
        logger.warning(
            "kNN %s: recall@%d %.3f (target %.2f), max score error %.4f (target %.3f) on %d sampled queries",
            *(kind, k_eff, check.recall, min_recall, check.max_score_error, max_error, len(q)),
        )
    return sims, ids, check


Measure = Callable[[np.ndarray, np.ndarray, AnnCheck], bool]


def _checked_partition(
    queries: np.ndarray,
    keys: np.ndarray,
    q: np.ndarray,
    k: int,
    self_search: bool,
    check: AnnCheck,
    measure: Measure,
    budget: float,
    min_recall: float,
    must_run: bool,
    device: str | None,
) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """Tune the cells probed on the sample, then run the full search (+ refinement) and measure its
    result on the sample; ``(None, None, False)`` when tuning gave up and not ``must_run``."""
    n = queries.shape[0]
    t0 = time.perf_counter()
    part = build_partition(keys, device=device)
    nlist = check.nlist = part.nlist
    effort = 4
    while True:  # on the sample only: len(q) / n of a full search
        check.effort = effort = min(effort, nlist)
        t = time.perf_counter()
        s, i = partition_search(part, keys, queries[q], k, effort, query_ids=q if self_search else None, device=device)
        check.seconds_ann_estimate = time.perf_counter() - t0 + (time.perf_counter() - t) * n / len(q)
        # a self-search is refined afterwards, which repairs the rare rows that make the max error:
        # the sample's mean recall is what the probes must reach
        ready = measure(s, i, check) or (self_search and check.recall >= min_recall)
        logger.info("partition: %d of %d cells, sampled recall %.4f", effort, nlist, check.recall)
        if ready or effort >= nlist or check.seconds_ann_estimate > budget:
            break
        effort *= 2
    if not must_run and (not ready or check.seconds_ann_estimate > budget):
        return None, None, False
    while True:  # the full search, measured on the sample; more probes while the budget allows
        t = time.perf_counter()
        sims, ids = _run_partition(part, queries, keys, k, self_search, check, device)
        check.seconds_ann_estimate = time.perf_counter() - t0
        good = measure(sims[q], ids[q], check)
        logger.info(
            "partition: full search at %d cells + refinement, %.0f s: sampled recall %.4f, max score error %.4f",
            *(check.effort, time.perf_counter() - t, check.recall, check.max_score_error),
        )
        if good or check.effort >= nlist or check.seconds_ann_estimate + 2 * (time.perf_counter() - t) > budget:
            return sims, ids, good
        check.effort = min(2 * check.effort, nlist)


def _run_partition(
    part: Partition,
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    self_search: bool,
    check: AnnCheck,
    device: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    query_ids = np.arange(queries.shape[0]) if self_search else None
    sims, ids = partition_search(part, keys, queries, k, check.effort or 1, query_ids=query_ids, device=device)
    if self_search:
        sims, ids = refine_self(queries, sims, ids, device=device)
        check.refined = True
    return sims, ids


def _checked_faiss(
    queries: np.ndarray,
    keys: np.ndarray,
    q: np.ndarray,
    k: int,
    self_search: bool,
    check: AnnCheck,
    measure: Measure,
    budget: float,
    kind: str,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Double the faiss effort until the sample meets both targets (or it is exhausted, or past the
    time budget), then search everything at that effort."""
    n = queries.shape[0]
    t = time.perf_counter()
    index = build_ann(keys, kind)
    t_build = time.perf_counter() - t
    check.nlist = getattr(index, "nlist", None)
    effort, limit = (8, index.nlist) if kind == "ivf" else (32, 1024)  # up to an exhaustive IVF scan
    while True:
        effort = check.effort = set_effort(index, kind, effort)
        t = time.perf_counter()
        s, i = ann_search(index, kind, queries[q], k + (1 if self_search else 0), False)
        if self_search:
            s, i = _drop_rows(s, i, q, k)
        check.seconds_ann_estimate = t_build + (time.perf_counter() - t) * n / len(q)
        good = measure(s, i, check)
        if good or effort >= limit or check.seconds_ann_estimate > budget:
            break
        effort *= 2
    sims, ids = ann_search(index, kind, queries, k, self_search)
    return sims, ids, good


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
