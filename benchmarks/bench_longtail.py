"""Long-tail scores: ours (symmetric blocked torch kNN) against sklearn
``NearestNeighbors(metric="cosine", algorithm="brute")`` as the method uses it, plus recall@k and
score error of the faiss ANN backends.

python benchmarks/bench_longtail.py --sizes 10000 20000 --ann-sizes 50000 --dim 1024
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
from reference_impls import reference_long_tail  # noqa: E402

from lmmixup_hf.embed.neighbors import knn  # noqa: E402
from lmmixup_hf.stages.longtail import long_tail_raw  # noqa: E402


def rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000], help="exact vs sklearn")
    ap.add_argument("--ann-sizes", type=int, nargs="*", default=[50_000], help="ANN recall runs")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many interleaved runs")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2k rows at 128-d, no ANN")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.ann_sizes, args.dim, args.repeat = [2000], [], 128, 1
    print("| N | method | seconds | max abs diff vs sklearn | speed-up |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        x = synthetic(n, args.dim, group=30)
        t_ours = t_ref = float("inf")
        for _ in range(args.repeat):  # interleaved, best of: the machine is shared
            t = time.perf_counter()
            ours = long_tail_raw(x, args.k)
            t_ours = min(t_ours, time.perf_counter() - t)
            t = time.perf_counter()
            ref = reference_long_tail(x, args.k)
            t_ref = min(t_ref, time.perf_counter() - t)
        diff = float(np.abs(ours - ref).max())
        print(f"| {n:,} | sklearn brute cosine | {t_ref:.1f} | - | 1.0x |")
        print(f"| {n:,} | ours (exact) | {t_ours:.1f} | {diff:.1e} | {t_ref / t_ours:.1f}x |", flush=True)
    print(f"\npeak RSS so far {rss_mib():,} MiB\n")
    print(f"| N | backend | seconds | recall@{args.k} | max abs score error |")
    print("|---|---|---|---|---|")
    for n in args.ann_sizes:
        x = synthetic(n, args.dim, group=30)
        t = time.perf_counter()
        exact_s, exact_i = knn(x, k=args.k)
        print(f"| {n:,} | exact (torch, with ids) | {time.perf_counter() - t:.1f} | 1.000 | 0 |", flush=True)
        exact_lt = (1 - exact_s.astype(np.float64)).mean(1)
        for backend in ("ivf", "hnsw"):
            t = time.perf_counter()
            s, i = knn(x, k=args.k, backend=backend)
            secs = time.perf_counter() - t
            recall = (i[:, :, None] == exact_i[:, None, :]).any(2).mean()
            err = float(np.abs((1 - s.astype(np.float64)).mean(1) - exact_lt).max())
            print(f"| {n:,} | faiss {backend} | {secs:.1f} | {recall:.3f} | {err:.3f} |", flush=True)
    print(f"\npeak RSS {rss_mib():,} MiB")


if __name__ == "__main__":
    main()
