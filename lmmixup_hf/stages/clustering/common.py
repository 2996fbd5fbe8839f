"""What both clustering algorithms share: the result type, the inverted-file candidate search over
coarse cells, cohesion and label renumbering."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmmixup_hf.embed.neighbors import knn

LEFTOVER = -1


# -- one subset, end to end -----------------------------------------------------------------------
@dataclass
class ClusterResult:
    labels: np.ndarray  # (n,) cluster ids 0..K-1, -1 for leftovers
    caps: np.ndarray  # drawn: the sampled capacities (cluster c has at most caps[c] members); data: the sizes
    swaps: int = 0
    rounds: int = 0  # data: merge rounds


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


def compact_labels(labels: np.ndarray, offset: int = 0) -> tuple[np.ndarray, int]:
    """Renumber used cluster ids to ``offset..offset+K-1`` (leftovers stay -1)."""
    used = np.unique(labels[labels >= 0])
    out = np.full_like(labels, LEFTOVER)
    out[labels >= 0] = np.searchsorted(used, labels[labels >= 0]) + offset
    return out, len(used)
