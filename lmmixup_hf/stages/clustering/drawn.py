"""``sizes="drawn"``: the method's cluster sizes. Capacities drawn from a rounded
Normal(mean_cap, std_cap), then a capacity-constrained assignment to two-level k-means centres and
a refinement (balanced k-means steps, size-preserving swaps); see ``lmmixup_hf.stages.cluster``."""

from __future__ import annotations

import math

import numpy as np
import torch

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.embed.kmeans import coarse_cells, spherical_kmeans
from lmmixup_hf.embed.kmeans import normalize_rows as _normalize
from lmmixup_hf.embed.neighbors import knn, resolve_device
from lmmixup_hf.stages.clustering.common import LEFTOVER, ClusterResult, candidate_centres
from lmmixup_hf.stages.clustering.options import ClusterOptions

_D = ClusterOptions()  # the keyword defaults below are ClusterOptions' own, written there once


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


# -- the capacity assignment -----------------------------------------------------------------------
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


# -- one subset, end to end -----------------------------------------------------------------------
def capacity_cluster(
    x: np.ndarray,
    *,
    min_size: int = _D.min_size,
    max_size: int = _D.max_size,
    mean_cap: float = _D.mean_cap,
    std_cap: float = _D.std_cap,
    seed: int = _D.seed,
    cell_size: int = _D.cell_size,
    n_candidates: int = _D.n_candidates,
    neighbor_cells: int = 2,
    kmeans_iters: int = _D.kmeans_iters,
    balance_iters: int = _D.balance_iters,
    refine_rounds: int = _D.refine_rounds,
    sim_floor: float | None = _D.sim_floor,
    device: str | None = _D.device,
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
