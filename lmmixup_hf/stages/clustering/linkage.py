"""``sizes="data"``: sizes follow the data. Size-capped average-linkage clustering over an
approximate kNN graph; see ``lmmixup_hf.stages.cluster``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmmixup_hf.embed.kmeans import coarse_cells
from lmmixup_hf.embed.neighbors import resolve_device
from lmmixup_hf.stages.clustering.common import LEFTOVER, ClusterResult, candidate_centres, compact_labels
from lmmixup_hf.stages.clustering.options import ClusterOptions

_D = ClusterOptions()  # the keyword defaults below are ClusterOptions' own, written there once


def cell_neighbors(
    x: np.ndarray,
    rows: np.ndarray,
    cells: np.ndarray,
    point_cell: np.ndarray,
    k: int,
    probe: int,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k neighbours ``(sims, ids)``, best first (``-inf`` / ``-1`` where fewer
    exist), of ``x[rows]`` among all other rows: exact search among the rows of the query's
    ``probe`` nearest coarse cells, so the cost is ``len(rows) x probe x cell size`` dot products,
    never N x N."""
    sims, ids = candidate_centres(x[rows], x, point_cell, cells, min(k + 1, x.shape[0]), probe, device)
    own = ids == rows[:, None]
    drop = np.where(own.any(1), own.argmax(1), ids.shape[1] - 1)  # self, else the weakest
    keep = np.ones(ids.shape, bool)
    keep[np.arange(len(rows)), drop] = False
    return sims[keep].reshape(len(rows), -1), ids[keep].reshape(len(rows), -1)


def size_penalty(size: np.ndarray, mean_cap: float, std_cap: float, size_prior: float) -> np.ndarray:
    """The size prior: ``size_prior`` per std above the prior mean size, so that a cluster larger than
    usual needs a higher mean cosine to form (std 0 counts as 1)."""
    return size_prior * np.maximum(size - mean_cap, 0) / max(std_cap, 1.0)


@dataclass
class _Merging:
    """Clusters being merged: the cluster of every row (its smallest row id), sizes and vector sums."""

    parent: np.ndarray
    size: np.ndarray
    sums: torch.Tensor
    rounds: int = 0

    def pairs_of(self, rows: np.ndarray, sims: np.ndarray, nbr: np.ndarray, floor: float) -> np.ndarray:
        """Unique cluster pairs ``lo * n + hi`` linked by a neighbour edge of cosine >= ``floor``.

        Lower edges are not needed: two clusters whose mean cross cosine reaches ``floor`` have at
        least one cross pair at or above it, and that pair is an edge of the neighbour graph."""
        n = len(self.parent)
        a = np.repeat(rows, nbr.shape[1])
        b = nbr.ravel()
        ok = (b >= 0) & (sims.ravel() >= floor)
        a, b = self.parent[a[ok]], self.parent[b[ok]]
        a, b = a[a != b], b[a != b]
        return np.unique(np.minimum(a, b) * n + np.maximum(a, b))

    def run(
        self, pairs: np.ndarray, max_size: int, bar: float, mean_cap: float, std_cap: float, prior: float
    ) -> np.ndarray:
        """Merge mutual best partners in rounds until no candidate pair reaches ``bar``; returns the
        pairs still fitting in ``max_size`` (candidates for a later pass)."""
        n = len(self.parent)
        link = np.full(len(pairs), np.nan)  # cached average linkage per pair, NaN = to compute
        while len(pairs):
            pa, pb = pairs // n, pairs % n
            fits = self.size[pa] + self.size[pb] <= max_size  # sizes only grow: a pair that no longer fits never will
            pairs, pa, pb, link = pairs[fits], pa[fits], pb[fits], link[fits]
            todo = np.flatnonzero(np.isnan(link))
            for i in range(0, len(todo), 65536):
                t = todo[i : i + 65536]
                ta, tb = torch.from_numpy(pa[t]), torch.from_numpy(pb[t])
                dots = (self.sums[ta] * self.sums[tb]).sum(1).double().numpy()
                link[t] = dots / (self.size[pa[t]] * self.size[pb[t]])
            score = link - size_penalty(self.size[pa] + self.size[pb], mean_cap, std_cap, prior)
            good = score >= bar
            if not good.any():
                break
            u = np.concatenate([pa[good], pb[good]])
            v = np.concatenate([pb[good], pa[good]])
            s = np.concatenate([score[good], score[good]])
            order = np.lexsort((v, -s, u))  # per cluster: best score, then smallest partner id
            u, v = u[order], v[order]
            first = np.r_[True, u[1:] != u[:-1]]
            best = np.full(n, -1, np.int64)
            best[u[first]] = v[first]
            lo = np.flatnonzero(best >= 0)
            lo = lo[(best[best[lo]] == lo) & (lo < best[lo])]
            hi = best[lo]
            self.sums[torch.from_numpy(lo)] += self.sums[torch.from_numpy(hi)]
            self.size[lo] += self.size[hi]
            self.size[hi] = 0
            to = np.arange(n)
            to[hi] = lo
            self.parent = to[self.parent]
            pa, pb = to[pa], to[pb]
            keep = pa != pb
            pa, pb = pa[keep], pb[keep]
            dirty = np.zeros(n, bool)
            dirty[lo] = True
            link = np.where(dirty[pa] | dirty[pb], np.nan, link[keep])
            pairs, first_at = np.unique(np.minimum(pa, pb) * n + np.maximum(pa, pb), return_index=True)
            link = link[first_at]
            self.rounds += 1
        return pairs


def data_cluster(
    x: np.ndarray,
    *,
    min_size: int = _D.min_size,
    max_size: int = _D.max_size,
    mean_cap: float = _D.mean_cap,
    std_cap: float = _D.std_cap,
    min_cohesion: float = _D.min_cohesion,
    size_prior: float = _D.size_prior,
    n_neighbors: int | None = None,
    cell_size: int = _D.cell_size,
    probe: int = 3,
    repair_probe: int = 24,
    kmeans_iters: int = _D.kmeans_iters,
    seed: int = _D.seed,
    device: str | None = _D.device,
) -> ClusterResult:
    """Size-capped average-linkage clustering of L2-normalised rows over their kNN graph.

    Every row starts alone. Each round, every cluster picks its best partner among the clusters its
    members have as neighbours: the highest mean pairwise cosine (average linkage, exact from the
    clusters' vector sums: ``S_a . S_b / (n_a n_b)``) minus the size prior, among merges that stay
    within ``max_size`` and reach ``min_cohesion``; mutual choices merge, all at once (the best pair
    overall is always mutual, so every round merges). By induction every cluster's mean pairwise
    cosine is at least ``min_cohesion``.

    The neighbour graph is approximate (an inverted file over coarse cells). Rows that end the first
    pass in a cluster below ``min_size`` search again over ``repair_probe`` cells, and merging
    resumes with the edges found, so a row is a leftover because its neighbourhood is empty, not
    because the index missed it. Clusters still below ``min_size`` are leftovers (``-1``).

    The coarse k-means and the neighbour search run on ``device`` (default: cuda when available).
    """
    device = resolve_device(device)
    n = x.shape[0]
    if n == 0 or max_size < 2:
        return ClusterResult(np.full(n, LEFTOVER, np.int64), np.zeros(0, np.int64))
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = n_neighbors or min(max_size + 1, 16)
    with torch.inference_mode():
        xd = torch.from_numpy(x).to(device)
        cells, point_cell = coarse_cells(xd, cell_size, niter=kmeans_iters, seed=seed)
        cells = cells.cpu().numpy()
        del xd
        state = _Merging(np.arange(n), np.ones(n, np.int64), torch.from_numpy(x.copy()))
        rows = np.arange(n)
        pairs = state.pairs_of(rows, *cell_neighbors(x, rows, cells, point_cell, k, probe, device), min_cohesion)
        rest = state.run(pairs, max_size, min_cohesion, mean_cap, std_cap, size_prior)
        small = np.flatnonzero(state.size[state.parent] < min_size)
        if len(small) and repair_probe > probe:
            found = state.pairs_of(
                small, *cell_neighbors(x, small, cells, point_cell, k, repair_probe, device), min_cohesion
            )
            n_c = len(state.parent)
            pairs = np.union1d(state.parent[rest // n_c] * n_c + state.parent[rest % n_c], found)
            state.run(pairs, max_size, min_cohesion, mean_cap, std_cap, size_prior)
    labels = np.where(state.size[state.parent] >= min_size, state.parent, LEFTOVER)
    labels, k_out = compact_labels(labels)
    sizes = np.bincount(labels[labels >= 0], minlength=k_out).astype(np.int64)
    return ClusterResult(labels, sizes, rounds=state.rounds)
