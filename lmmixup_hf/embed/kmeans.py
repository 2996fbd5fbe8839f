"""Spherical k-means (cosine) in torch: the coarse cells of ``cluster`` and of the partitioned kNN
search (``partition.build_partition``)."""

from __future__ import annotations

import math

import numpy as np
import torch


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_centre(x: torch.Tensor, c: torch.Tensor, block: int = 8192) -> torch.Tensor:
    return torch.cat([(x[i : i + block] @ c.T).argmax(1) for i in range(0, x.shape[0], block)])


def spherical_kmeans(x: torch.Tensor, k: int, *, niter: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd iterations on the unit sphere (cosine); empty clusters are re-seeded from random points."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    if k >= n:
        return x.clone()
    centres = kmeans_pp(x, k, rng)
    for _ in range(niter):
        lab = nearest_centre(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, lab, x)
        empty = torch.bincount(lab, minlength=k) == 0
        if bool(empty.any()):
            sums[empty] = x[torch.from_numpy(rng.choice(n, int(empty.sum()), replace=False))]
        centres = normalize_rows(sums)
    return centres


def kmeans_pp(x: torch.Tensor, k: int, rng: np.random.Generator, rounds: int = 16) -> torch.Tensor:
    """D^2 (k-means++) seeding, drawing k/rounds centres per round so that seeding costs a few
    matmuls instead of k sequential passes; spreads the initial centres over the groups."""
    if x.shape[0] > 32 * k:  # seed from a sample, as faiss does
        x = x[torch.from_numpy(np.sort(rng.choice(x.shape[0], 32 * k, replace=False)))]
    n = x.shape[0]
    chosen = np.array([rng.integers(n)])
    dist = (2 - 2 * (x @ x[int(chosen[0])])).clamp_min(0).double().cpu().numpy()
    per_round = max(1, math.ceil((k - 1) / rounds))
    while len(chosen) < k:
        p = dist.copy()
        p[chosen] = 0
        total = p.sum()
        want = min(per_round, k - len(chosen))
        if total <= 0 or np.count_nonzero(p) < want:
            rest = np.setdiff1d(np.arange(n), chosen)
            new = rng.choice(rest, want, replace=False)
        else:
            new = rng.choice(n, want, replace=False, p=p / total)
        chosen = np.concatenate([chosen, new])
        near = (x @ x[torch.from_numpy(new)].T).max(1).values
        dist = np.minimum(dist, (2 - 2 * near).clamp_min(0).double().cpu().numpy())
    return x[torch.from_numpy(chosen)].clone()


def coarse_cells(
    x: torch.Tensor, cell_size: int, *, niter: int = 10, seed: int = 0, max_cells: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Coarse spherical k-means into cells of ~``cell_size`` rows (trained on a sample of 64 rows per
    cell): ``(cell centres, cell of every row)``."""
    n = x.shape[0]
    n_cells = max(1, min(round(n / cell_size), n if max_cells is None else max_cells))
    if n_cells == 1:
        return normalize_rows(x.mean(0, keepdim=True)), np.zeros(n, np.int64)
    rng = np.random.default_rng(seed)
    sample = x[torch.from_numpy(np.sort(rng.choice(n, min(n, 64 * n_cells), replace=False)))]
    cells = spherical_kmeans(sample, n_cells, niter=niter, seed=seed)
    return cells, nearest_centre(x, cells).cpu().numpy()
