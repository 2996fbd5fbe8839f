"""Long-tail at scale: faiss IVF over N synthetic rows, checked against exact scores on a sample.

python benchmarks/bench_longtail_scale.py --n 1000000 --dim 384
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_clustering import synthetic  # noqa: E402

from lmmixup_hf.embed.neighbors import knn  # noqa: E402
from lmmixup_hf.stages.longtail import long_tail_raw  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--sample", type=int, default=2000, help="rows checked against exact scores")
    args = ap.parse_args()
    n, k = args.n, args.k
    x = synthetic(n, args.dim)

    t = time.perf_counter()
    lt = long_tail_raw(x, k, backend="ivf")
    secs = time.perf_counter() - t

    q = np.random.default_rng(0).choice(n, args.sample, replace=False)
    t = time.perf_counter()
    sims, idx = knn(x[q], x, k=k + 1)  # exact against every row; the row itself is dropped below
    secs_sample = time.perf_counter() - t
    keep = idx != q[:, None]
    sims = np.stack([row[m][:k] for row, m in zip(sims, keep)])
    exact = (1 - sims.astype(np.float64)).mean(1)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| N | d | method | seconds | max abs error vs exact ({args.sample:,} rows) | peak RSS |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {n:,} | {args.dim} | long-tail, faiss IVF | {secs:.0f} | {np.abs(lt[q] - exact).max():.4f} | {rss:,.0f} MiB |"
    )
    hours = secs_sample * n / args.sample / 3600
    print(f"exact scores for {args.sample:,} rows against all {n:,}: {secs_sample:.0f} s (all-vs-all: ~{hours:.1f} h)")


if __name__ == "__main__":
    main()
