"""kNN: exact blocked torch vs faiss IVF / HNSW, all-vs-all, with recall@k against exact.

python benchmarks/bench_knn.py --sizes 10000 100000 --dim 384 --k 16
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from lmmixup_hf.embed.neighbors import knn


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Embeddings with topical structure (mixture of Gaussians on the sphere), like real text."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def uniform(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument(
        "--data",
        choices=["clustered", "random"],
        default="clustered",
        help="clustered: topical structure like text embeddings; random: uniform on the sphere (worst case)",
    )
    ap.add_argument("--quick", action="store_true", help="a 5k smoke run")
    args = ap.parse_args()
    sizes = [5_000] if args.quick else args.sizes
    print(f"data: {args.data}, d={args.dim}, k={args.k}, all-vs-all, self excluded")
    print(f"| N | backend | seconds | recall@{args.k} |")
    print("|---|---|---|---|")
    for n in sizes:
        x = clustered(n, args.dim) if args.data == "clustered" else uniform(n, args.dim)
        t = time.perf_counter()
        _, exact = knn(x, k=args.k)
        print(f"| {n:,} | exact (torch, blocked) | {time.perf_counter() - t:.1f} | 1.000 |", flush=True)
        for backend in ("ivf", "hnsw"):
            try:
                t = time.perf_counter()
                _, approx = knn(x, k=args.k, backend=backend)
            except Exception as e:  # faiss missing
                print(f"| {n:,} | {backend} | - | ({e}) |")
                continue
            secs = time.perf_counter() - t
            hits = (approx[:, :, None] == exact[:, None, :]).any(2).sum()
            print(f"| {n:,} | faiss {backend} | {secs:.1f} | {hits / exact.size:.3f} |", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
