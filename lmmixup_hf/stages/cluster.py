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
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from datasets import Dataset

from lmmixup_hf.data.schema import CLUSTER_ID, ID, SOURCE, LmmixupError
from lmmixup_hf.embed.kmeans import coarse_cells, spherical_kmeans
from lmmixup_hf.embed.kmeans import normalize_rows as _normalize
from lmmixup_hf.embed.neighbors import knn, resolve_device
from lmmixup_hf.options import OptionError, Options, check_order, resolve

logger = logging.getLogger(__name__)

LEFTOVER = -1


# -- capacities -----------------------------------------------------------------------------------
def sample_caps(
    n: int, min_size: int = 2, max_size: int = 25, mean_cap: float = 10.0, std_cap: float = 3.0, seed: int = 42
) -> np.ndarray:
    """Cluster capacities: rounded Normal(mean_cap, std_cap) draws clipped to [min_size, max_size]
    until they cover ``n``, then trimmed so that they sum to ``n`` exactly, shuffled.

    The excess is taken from the last capacities first (down to ``min_size``), as the method does.
    ``n < min_size`` gives no capacity at all (those rows become leftovers); a size range that no
    number of clusters can meet exactly (e.g. n=3 with sizes in [2, 2]) gives capacities that sum to
    less than ``n`` and the rest become leftovers.
    """
    if not 1 <= min_size <= max_size:
        raise LmmixupError(f"cluster sizes need 1 <= min_size <= max_size, got {min_size} and {max_size}")
    if n < min_size:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < n:
        m = int((n - total) / max(mean_cap, 1.0) * 1.1) + 16
        x = np.clip(np.rint(rng.normal(mean_cap, std_cap, m)), min_size, max_size).astype(np.int64)
        cum = total + np.cumsum(x)
        stop = int(np.searchsorted(cum, n))  # first draw that reaches n
        parts.append(x[: stop + 1])
        total = int(cum[min(stop, m - 1)])
    caps = np.concatenate(parts)
    caps = caps[::-1].copy()  # trim from the last capacity backwards
    caps -= _take(caps - min_size, total - n)
    excess = int(caps.sum()) - n
    if excess > 0:  # every capacity is at min_size: drop whole clusters, then top the rest up
        caps = caps[math.ceil(excess / min_size) :]
    caps = caps[::-1].copy()
    caps += _take(max_size - caps, n - int(caps.sum()))
    return caps[rng.permutation(len(caps))]


def _take(room: np.ndarray, amount: int) -> np.ndarray:
    """Take up to ``amount`` units from ``room``, front first (vectorised water filling)."""
    if amount <= 0 or len(room) == 0:
        return np.zeros_like(room)
    before = np.concatenate([[0], np.cumsum(room)[:-1]])
    return np.clip(amount - before, 0, room)


# -- spherical k-means (lmmixup_hf.embed.kmeans) --------------------------------------------------
def _split_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder)."""
    share = total * weights / weights.sum()
    out = np.floor(share).astype(np.int64)
    rest = total - int(out.sum())
    out[np.argsort(-(share - out), kind="stable")[:rest]] += 1
    return out


def two_level_centres(
    x: torch.Tensor, k: int, *, cell_size: int = 512, niter: int = 10, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, torch.Tensor]:
    """``k`` centres: coarse cells of ~``cell_size`` points, then k-means inside each cell with a
    number of centres proportional to its size. Returns (centres, centre_cell, point_cell, cells)."""
    cells, point_cell = coarse_cells(x, cell_size, niter=niter, seed=seed, max_cells=k)
    n_cells = len(cells)
    sizes = np.bincount(point_cell, minlength=n_cells)
    per_cell = np.minimum(_split_counts(k, sizes.astype(np.float64)), sizes)
    short = k - int(per_cell.sum())  # only when a cell would need more centres than points
    if short:
        per_cell += _take(sizes - per_cell, short)
    order = np.argsort(point_cell, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    centres, centre_cell = [], []
    for c in np.flatnonzero(per_cell):
        members = x[torch.from_numpy(order[starts[c] : starts[c + 1]])]
        centres.append(spherical_kmeans(members, int(per_cell[c]), niter=niter, seed=seed + int(c)))
        centre_cell.append(np.full(int(per_cell[c]), c, np.int64))
    return torch.cat(centres), np.concatenate(centre_cell), point_cell, cells


# -- candidate centres and the capacity assignment ------------------------------------------------
def candidate_centres(
    x: np.ndarray,
    centres: np.ndarray,
    centre_cell: np.ndarray,
    cells: np.ndarray,
    m: int,
    probe: int,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-m centres per point among the centres of the point's ``probe`` nearest cells (an
    inverted file over the centres): ``(sims, centre ids)``, each ``(n, m)``, best first; missing
    slots are ``-inf`` / ``-1``."""
    n = x.shape[0]
    if len(cells) == 1:
        probe = 1
    _, near = (
        knn(x, cells, k=min(probe, len(cells)), device=device)
        if len(cells) > 1
        else (None, np.zeros((n, 1), np.int64))
    )
    by_cell = np.argsort(centre_cell, kind="stable")
    cstart = np.searchsorted(centre_cell[by_cell], np.arange(len(cells) + 1))
    sims = np.full((n, near.shape[1] * m), -np.inf, np.float32)
    ids = np.full((n, near.shape[1] * m), -1, np.int64)
    for r in range(near.shape[1]):  # the r-th nearest cell of every point, one cell at a time
        order = np.argsort(near[:, r], kind="stable")
        pstart = np.searchsorted(near[order, r], np.arange(len(cells) + 1))
        for c in np.flatnonzero(pstart[1:] > pstart[:-1]):
            pts = order[pstart[c] : pstart[c + 1]]
            group = by_cell[cstart[c] : cstart[c + 1]]
            if len(group) == 0:
                continue
            sv, iv = knn(x[pts], centres[group], k=m, device=device)
            cols = slice(r * m, r * m + sv.shape[1])
            sims[pts, cols], ids[pts, cols] = sv, group[iv]
    if near.shape[1] > 1:
        top = np.argsort(-sims, axis=1, kind="stable")[:, :m]
        sims, ids = np.take_along_axis(sims, top, 1), np.take_along_axis(ids, top, 1)
    return sims, ids


def propose_rounds(
    cand_ids: np.ndarray, cand_sims: np.ndarray, cap_left: np.ndarray, rows: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Greedy capacity assignment in vectorised rounds; returns the rows left unplaced.

    Round r: every unplaced row proposes to its r-th candidate; each centre accepts its most similar
    proposals up to its free capacity (for the first round this is exactly the method's greedy by
    descending priority). Updates ``labels`` and ``cap_left`` in place.
    """
    m = cand_ids.shape[1]
    local = np.arange(len(rows))
    ptr = np.zeros(len(rows), np.int64)
    for _ in range(m):
        if len(local) == 0:
            break
        c = cand_ids[local, ptr[local]]
        s = cand_sims[local, ptr[local]]
        ok = (c >= 0) & (cap_left[np.maximum(c, 0)] > 0)
        who, c, s = local[ok], c[ok], s[ok]
        order = np.lexsort((-s, c))
        who, c = who[order], c[order]
        first = np.searchsorted(c, c, side="left")
        accept = (np.arange(len(c)) - first) < cap_left[c]
        labels[rows[who[accept]]] = c[accept]
        np.subtract.at(cap_left, c[accept], 1)
        placed = np.zeros(len(rows), bool)
        placed[who[accept]] = True
        local = local[~placed[local]]
        ptr[local] += 1
        local = local[ptr[local] < m]
    return rows[labels[rows] < 0]


def assign(
    x: np.ndarray,
    centres: np.ndarray,
    caps: np.ndarray,
    cand_sims: np.ndarray,
    cand_ids: np.ndarray,
    sim_floor: float | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Labels (``-1`` = leftover) with every cluster holding at most its capacity; without a floor
    and with ``sum(caps) == n`` every point is placed and every cluster is exactly full."""
    n, m = cand_ids.shape
    labels = np.full(n, LEFTOVER, np.int64)
    cap_left = caps.astype(np.int64).copy()
    if sim_floor is not None:
        cand_ids = np.where(cand_sims >= sim_floor, cand_ids, -1)
    rows = propose_rounds(cand_ids, cand_sims, cap_left, np.arange(n), labels)
    while len(rows) and cap_left.sum() > 0:  # every candidate was full: search the centres with room
        free = np.flatnonzero(cap_left > 0)
        s, i = knn(x[rows], centres[free], k=min(m, len(free)), device=device)
        ids = free[i]
        if sim_floor is not None:
            ids = np.where(s >= sim_floor, ids, -1)
            rows = rows[(ids >= 0).any(1)]
            ids, s = ids[(ids >= 0).any(1)], s[(ids >= 0).any(1)]
        before = len(rows)
        rows = propose_rounds(ids, s, cap_left, rows, labels)
        if len(rows) == before:  # nothing placeable above the floor
            break
    return labels


# -- refinement -----------------------------------------------------------------------------------
def _dot_rows(x: torch.Tensor, sums: torch.Tensor, idx: np.ndarray, block: int = 256) -> torch.Tensor:
    """``x[i] . sums[idx[i, j]]`` for every (i, j), in blocks (never an (n, m, d) tensor at once)."""
    out = torch.empty(idx.shape, dtype=x.dtype)
    t = torch.from_numpy(np.maximum(idx, 0))
    for i in range(0, x.shape[0], block):
        out[i : i + block] = torch.einsum("nd,nmd->nm", x[i : i + block], sums[t[i : i + block]])
    return out


def refine_swaps(
    x: np.ndarray, labels: np.ndarray, cand_ids: np.ndarray, n_clusters: int, rounds: int = 10
) -> tuple[np.ndarray, int]:
    """Size-preserving swaps that raise the sum of the clusters' mean pairwise cosines.

    Each point proposes the candidate cluster it is most similar to on average (relative to its own
    cluster); opposite proposals between two clusters are paired by rank, the exact change of both
    clusters' cohesion is computed, and the best improving swap per cluster is applied (swaps
    that share no cluster are independent, so every round strictly improves). Returns
    ``(labels, swaps)``.
    """
    labels = labels.copy()
    placed = np.flatnonzero(labels >= 0)
    if len(placed) == 0 or rounds <= 0:
        return labels, 0
    xt = torch.from_numpy(np.ascontiguousarray(x[placed], dtype=np.float32))
    lab = labels[placed]
    cand = cand_ids[placed]
    size = np.bincount(lab, minlength=n_clusters).astype(np.float64)
    sums = torch.zeros((n_clusters, x.shape[1]), dtype=torch.float32).index_add_(0, torch.from_numpy(lab), xt)
    pairs_norm = np.maximum(size * (size - 1) / 2, 1.0)
    n_swaps = 0
    with torch.inference_mode():
        for _ in range(rounds):
            own = (xt * sums[torch.from_numpy(lab)]).sum(1).numpy().astype(np.float64)  # x.S_a
            alt = _dot_rows(xt, sums, cand).numpy().astype(np.float64)  # x.S_b for candidates
            valid = (cand >= 0) & (cand != lab[:, None]) & (size[np.maximum(cand, 0)] > 1)
            own_mean = (own - 1) / np.maximum(size[lab] - 1, 1)
            gain = np.where(valid, alt / np.maximum(size[np.maximum(cand, 0)], 1) - own_mean[:, None], -np.inf)
            best = gain.argmax(1)
            want = np.flatnonzero(gain[np.arange(len(lab)), best] > 0)
            if len(want) < 2:
                break
            a, b = lab[want], cand[want, best[want]]
            alt_b = alt[want, best[want]]
            g = gain[want, best[want]]
            key = a * n_clusters + b
            order = np.lexsort((-g, key))
            want, a, b, alt_b, key = want[order], a[order], b[order], alt_b[order], key[order]
            rank = np.arange(len(key)) - np.searchsorted(key, key, side="left")
            rev = b * n_clusters + a
            lo = np.searchsorted(key, rev, side="left")
            hi = np.searchsorted(key, rev, side="right")
            has = (a < b) & (rank < hi - lo)
            p = np.flatnonzero(has)
            q = lo[p] + rank[p]
            i, j = want[p], want[q]
            ci, cj = a[p], b[p]
            xij = (xt[torch.from_numpy(i)] * xt[torch.from_numpy(j)]).sum(1).numpy().astype(np.float64)
            d_a = alt_b[q] - xij - (own[i] - 1)  # j joins a, i leaves a (pairwise-sum change)
            d_b = alt_b[p] - xij - (own[j] - 1)  # i joins b, j leaves b
            delta = d_a / pairs_norm[ci] + d_b / pairs_norm[cj]
            good = np.flatnonzero(delta > 1e-9)
            if len(good) == 0:
                break
            good = good[np.argsort(-delta[good], kind="stable")]
            # a swap is applied when it is the best improving swap of both of its clusters
            both = np.stack([ci[good], cj[good]], 1).ravel()
            _, pos = np.unique(both, return_index=True)
            best_for = np.full(n_clusters, -1, np.int64)
            best_for[both[pos]] = np.repeat(good, 2)[pos]
            chosen = good[(best_for[ci[good]] == good) & (best_for[cj[good]] == good)]
            i, j, ci, cj = i[chosen], j[chosen], ci[chosen], cj[chosen]
            diff = xt[torch.from_numpy(j)] - xt[torch.from_numpy(i)]
            sums.index_add_(0, torch.from_numpy(ci), diff)
            sums.index_add_(0, torch.from_numpy(cj), -diff)
            lab[i], lab[j] = cj, ci
            n_swaps += len(chosen)
    labels[placed] = lab
    return labels, n_swaps


def cohesion(x: np.ndarray, labels: np.ndarray, n_clusters: int | None = None) -> np.ndarray:
    """Mean pairwise cosine inside each cluster, ``(||S||^2 - n) / (n (n - 1))`` for unit vectors;
    1.0 for singletons, NaN for empty ids."""
    placed = labels >= 0
    k = int(labels.max()) + 1 if n_clusters is None else n_clusters
    if k <= 0:
        return np.zeros(0)
    lab = torch.from_numpy(labels[placed])
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[torch.from_numpy(np.flatnonzero(placed))]
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float32).index_add_(0, lab, rows)
    n = np.bincount(labels[placed], minlength=k).astype(np.float64)
    sq = (sums * sums).sum(1).double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (sq - n) / (n * (n - 1))
    out[n == 1] = 1.0
    out[n == 0] = np.nan
    return out


# -- one subset, end to end -----------------------------------------------------------------------
@dataclass
class ClusterResult:
    labels: np.ndarray  # (n,) cluster ids 0..K-1, -1 for leftovers
    caps: np.ndarray  # drawn: the sampled capacities (cluster c has at most caps[c] members); data: the sizes
    swaps: int = 0
    rounds: int = 0  # data: merge rounds


def capacity_cluster(
    x: np.ndarray,
    *,
    min_size: int = 2,
    max_size: int = 25,
    mean_cap: float = 10.0,
    std_cap: float = 3.0,
    seed: int = 42,
    cell_size: int = 512,
    n_candidates: int = 8,
    neighbor_cells: int = 2,
    kmeans_iters: int = 5,
    balance_iters: int = 2,
    refine_rounds: int = 2,
    sim_floor: float | None = None,
    device: str | None = None,
) -> ClusterResult:
    """Cluster L2-normalised rows ``x`` into clusters whose sizes are sampled capacities. k-means and
    the kNN searches run on ``device`` (default: cuda when available); the rest on the CPU."""
    device = resolve_device(device)
    n = x.shape[0]
    caps = sample_caps(n, min_size, max_size, mean_cap, std_cap, seed)
    if len(caps) == 0:
        return ClusterResult(np.full(n, LEFTOVER, np.int64), caps)
    x = np.ascontiguousarray(x, dtype=np.float32)
    torch.manual_seed(seed)
    with torch.inference_mode():
        centres, centre_cell, point_cell, cells = two_level_centres(
            torch.from_numpy(x).to(device), len(caps), cell_size=cell_size, niter=kmeans_iters, seed=seed
        )
    centres_np, cells_np = centres.cpu().numpy(), cells.cpu().numpy()
    m = min(n_candidates, len(caps))
    sims, ids = candidate_centres(x, centres_np, centre_cell, cells_np, m, 1 + neighbor_cells, device)
    labels = assign(x, centres_np, caps, sims, ids, sim_floor, device)
    if sim_floor is not None:  # clusters the floor left too small are dissolved into leftovers
        small = np.bincount(labels[labels >= 0], minlength=len(caps)) < min_size
        labels[(labels >= 0) & small[np.maximum(labels, 0)]] = LEFTOVER
    for _ in range(balance_iters):  # capacity-constrained Lloyd steps: centres := member means
        new = balanced_step(x, labels, caps, ids, sim_floor)
        if np.array_equal(new, labels):
            break
        labels = new
    labels, swaps = refine_swaps(x, labels, ids, len(caps), refine_rounds)
    return ClusterResult(labels, caps, swaps)


def _cluster_sums(xt: torch.Tensor, labels: np.ndarray, k: int) -> tuple[torch.Tensor, np.ndarray]:
    placed = np.flatnonzero(labels >= 0)
    rows = xt if len(placed) == len(labels) else xt[torch.from_numpy(placed)]
    sums = torch.zeros((k, xt.shape[1]), dtype=torch.float32).index_add_(0, torch.from_numpy(labels[placed]), rows)
    return sums, np.bincount(labels[placed], minlength=k)


def _total_cohesion(sums: torch.Tensor, counts: np.ndarray) -> float:
    sq = (sums * sums).sum(1).double().numpy()
    ok = counts > 1
    return float(((sq[ok] - counts[ok]) / (counts[ok] * (counts[ok] - 1.0))).sum())


def balanced_step(
    x: np.ndarray, labels: np.ndarray, caps: np.ndarray, cand_ids: np.ndarray, sim_floor: float | None
) -> np.ndarray:
    """Move every centre to the mean of its members, then redo the capacity assignment over the
    same candidate clusters (a balanced k-means step); keeps the old labels if cohesion drops."""
    k = len(caps)
    xt = torch.from_numpy(x)
    sums, counts = _cluster_sums(xt, labels, k)
    empty = counts == 0
    centres = _normalize(sums)
    sims = _dot_rows(xt, centres, cand_ids).numpy()
    sims[(cand_ids < 0) | empty[np.maximum(cand_ids, 0)]] = -np.inf  # dissolved clusters stay empty
    order = np.argsort(-sims, axis=1, kind="stable")
    sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(cand_ids, order, 1)
    ids = np.where(np.isfinite(sims), ids, -1)
    new = assign(x, centres.numpy(), np.where(empty, 0, caps), sims, ids, sim_floor)
    new_sums, new_counts = _cluster_sums(xt, new, k)
    return new if _total_cohesion(new_sums, new_counts) > _total_cohesion(sums, counts) else labels


# -- data-driven sizes ----------------------------------------------------------------------------
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
    min_size: int = 2,
    max_size: int = 25,
    mean_cap: float = 10.0,
    std_cap: float = 3.0,
    min_cohesion: float = 0.6,
    size_prior: float = 0.02,
    n_neighbors: int | None = None,
    cell_size: int = 512,
    probe: int = 3,
    repair_probe: int = 24,
    kmeans_iters: int = 5,
    seed: int = 42,
    device: str | None = None,
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


def compact_labels(labels: np.ndarray, offset: int = 0) -> tuple[np.ndarray, int]:
    """Renumber used cluster ids to ``offset..offset+K-1`` (leftovers stay -1)."""
    used = np.unique(labels[labels >= 0])
    out = np.full_like(labels, LEFTOVER)
    out[labels >= 0] = np.searchsorted(used, labels[labels >= 0]) + offset
    return out, len(used)


class ClusteredRows(NamedTuple):
    rows: Dataset  # every clustered row with its `cluster_id`, in cluster order
    clusters: Dataset  # one row per cluster: cluster_id, source, size, member_ids, cohesion
    leftovers: Dataset  # rows with no close neighbours (data sizes: also distilled alone, see `rows`)
    stats: dict[str, Any]  # counts, per-source figures, mean cohesion, size histogram


@dataclass
class ClusterOptions(Options):
    """The clustering options (``lmmixup cluster`` takes the same ones as flags; its arguments
    dataclass extends this one, so each default is written here only)."""

    sizes: Literal["data", "drawn"] = field(
        default="data",
        metadata={
            "help": "`data`: sizes follow the data (merge while the mean pairwise cosine stays >= min_cohesion; "
            "rows with no close neighbours are distilled alone); `drawn`: the method's sizes drawn from "
            "Normal(mean_cap, std_cap), every row placed."
        },
    )
    min_size: int = field(default=2, metadata={"help": "Smallest cluster.", "range": "[1, inf)"})
    max_size: int = field(default=25, metadata={"help": "Largest cluster.", "range": "[1, inf)"})
    mean_cap: float = field(
        default=10.0,
        metadata={
            "help": "Mean cluster size: the drawn sizes' Normal, or the data sizes' prior.",
            "range": "(0, inf)",
        },
    )
    std_cap: float = field(
        default=3.0, metadata={"help": "Std of the drawn sizes / of the data sizes' prior.", "range": "[0, inf)"}
    )
    min_cohesion: float = field(
        default=0.6,
        metadata={"help": "data: every cluster's mean pairwise cosine is at least this.", "range": "[-1, 1]"},
    )
    size_prior: float = field(
        default=0.02,
        metadata={
            "help": "data: extra mean cosine a cluster needs per std_cap above mean_cap (0 = no prior).",
            "range": "[0, inf)",
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed for sizes and k-means.", "range": "[0, inf)"})
    sim_floor: float | None = field(
        default=None,
        metadata={
            "help": "drawn: minimum cosine to a cluster centre; points below go to leftovers/.",
            "range": "[-1, 1]",
        },
    )
    n_candidates: int = field(
        default=8, metadata={"help": "drawn: candidate centres per point (top-m).", "range": "[1, inf)"}
    )
    cell_size: int = field(default=512, metadata={"help": "Points per coarse k-means cell.", "range": "[1, inf)"})
    kmeans_iters: int = field(default=5, metadata={"help": "k-means iterations per level.", "range": "[0, inf)"})
    balance_iters: int = field(
        default=2,
        metadata={
            "help": "drawn: balanced k-means steps (centres := member means, reassign; 0 = off).",
            "range": "[0, inf)",
        },
    )
    refine_rounds: int = field(
        default=2, metadata={"help": "drawn: size-preserving swap rounds (0 = off).", "range": "[0, inf)"}
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device for k-means and kNN (default: cuda > cpu); `lmmixup cluster` embeds on it too "
            "(default: cuda > mps > cpu).",
            "fingerprint": False,
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_order(self, "min_size", "max_size")
        if self.sizes == "data" and self.sim_floor is not None:
            raise OptionError("sim_floor", "applies to sizes drawn only; data sizes use min_cohesion", self.sim_floor)


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

    >>> out = cluster_rows(low_rows, row_embeddings(low_rows, "BAAI/bge-m3"), sizes="data", max_size=5)

    ``options`` are the clustering options of ``lmmixup cluster`` (:class:`ClusterOptions`, default
    its defaults); keyword arguments change some of them (a bad one raises ``OptionError``). With
    data sizes a row with no close neighbours becomes a one-row cluster of its own (the distiller
    rewrites it alone) and is also listed in ``leftovers``; with drawn sizes and a ``sim_floor`` such
    rows get ``cluster_id = -1`` and are left out of ``rows``. ``map_sources`` clusters the sources
    (default :func:`cluster_sources`: here, one after the other)."""
    opts = resolve(ClusterOptions, options, changes)
    sources = np.asarray(list(ds[SOURCE]), dtype=object)
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
    ids = np.asarray(list(ds[ID]), dtype=object)
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
