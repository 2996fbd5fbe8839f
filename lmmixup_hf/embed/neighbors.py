"""Top-k neighbours over L2-normalised embeddings (inner product = cosine).

Exact search is a blocked torch matmul + topk: memory is bounded by ``query_block x key_block``
scores and never holds an N x N matrix. For very large N, ``partition`` (k-means cells searched as
BLAS blocks, then one neighbour-descent step; torch only) and faiss IVF or HNSW (when installed)
serve the same API, and :func:`checked_knn` measures their recall against exact search. The
backends live in ``device``, ``partition`` and ``ann``; this module is the one entry point.
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

from lmmixup_hf.embed.ann import _faiss, ann_search, build_ann, set_effort
from lmmixup_hf.embed.device import _as_tensor, resolve_device
from lmmixup_hf.embed.partition import (
    Partition,
    _drop_rows,
    build_partition,
    partition_search,
    refine_self,
)

__all__ = [
    "AUTO_MIN_KEYS",
    "MAX_SCORE_ERROR",
    "MIN_RECALL",
    "AnnCheck",
    "Backend",
    "Partition",
    "ann_search",
    "build_ann",
    "build_partition",
    "checked_knn",
    "knn",
    "partition_search",
    "refine_self",
    "resolve_device",
    "set_effort",
]

logger = logging.getLogger(__name__)

Backend = Literal["exact", "partition", "ivf", "hnsw", "auto"]


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
