"""Partitioned exact search without faiss: keys in spherical k-means cells searched as BLAS
blocks, then one neighbour-descent step for a self-search."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lmmixup_hf.embed.device import _as_tensor, resolve_device
from lmmixup_hf.embed.kmeans import coarse_cells


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


def _drop_rows(s: np.ndarray, i: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    own = i == rows[:, None]
    drop = np.where(own.any(1), own.argmax(1), i.shape[1] - 1)
    keep = np.ones_like(i, dtype=bool)
    keep[np.arange(len(rows)), drop] = False
    return s[keep].reshape(len(rows), -1)[:, :k], i[keep].reshape(len(rows), -1)[:, :k]
