"""Long-tail at scale: the self-checked ANN search (tuned effort, sampled recall) against exact.

python benchmarks/bench_longtail_scale.py --n 1000000 --dim 384 --backends auto ivf

For each backend: the search `longtail` runs (``checked_knn`` as ``long_tail_checked`` calls it),
its wall time, what it chose and tuned (cells probed / nprobe / efSearch), the recall@k and max
score error it measured on its own sample of queries, and, as an independent check, the recall and
the max / mean / p99.9 score error on ``--sample`` other rows against exact search.
The exact all-vs-all time is measured with ``--exact`` (below ~200k rows on a CPU) or else
estimated from the exact search of the sampled rows.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_clustering import synthetic  # noqa: E402

from lmmixup_hf.embed.neighbors import checked_knn, knn  # noqa: E402
from lmmixup_hf.stages.longtail import long_tail_checked, self_knn_sims  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--group", type=int, default=30, help="planted group size of the synthetic rows")
    ap.add_argument("--backends", nargs="*", default=["auto"])
    ap.add_argument("--sample", type=int, default=1000, help="rows checked independently against exact search")
    ap.add_argument("--exact", action="store_true", help="also time the exact all-vs-all search")
    ap.add_argument("--quick", action="store_true", help="20k rows, measured exact (seconds)")
    ap.add_argument(
        "--breakdown",
        type=int,
        metavar="NPROBE",
        help="also time the partition backend's phases at this many probed cells: search, then each refinement round",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")  # the tuning steps, on stderr
    if args.quick:
        args.n, args.sample, args.exact = 20_000, 200, True
    n, k = args.n, args.k
    x = synthetic(n, args.dim, group=args.group)
    q = np.random.default_rng(123).choice(n, args.sample, replace=False)
    t = time.perf_counter()
    sims, idx = knn(x[q], x, k=k + 1)
    t_sample = time.perf_counter() - t
    keep = idx != q[:, None]
    ex_ids = np.stack([row[m][:k] for row, m in zip(idx, keep)])
    ex_raw = np.stack([(1 - row[m][:k].astype(np.float64)).mean() for row, m in zip(sims, keep)])
    if args.exact:
        t = time.perf_counter()
        long_tail_checked(x, k, backend="exact")
        exact_s, how = time.perf_counter() - t, "measured"
    else:
        exact_s, how = t_sample * n / args.sample / 2, "estimated from the sample (symmetric: / 2)"
    print(f"N {n:,}, d {args.dim}, k {k}, planted groups of {args.group}; exact all-vs-all: {exact_s:.0f} s ({how})")
    print(
        "| backend | chose | effort | own sample: recall, max error | seconds | speed-up vs exact "
        "| independent sample: recall, max / mean / p99.9 error |"
    )
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends:
        t = time.perf_counter()
        # what long_tail_checked runs, keeping the ids for the independent recall
        sims, ids, check = checked_knn(x, None, k, backend=backend, exact=lambda: (self_knn_sims(x, k), None))
        raw = (1.0 - sims.astype(np.float64)).mean(1)
        secs = time.perf_counter() - t
        err = np.abs(raw[q] - ex_raw)
        recall = (
            1.0 if ids is None else float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids[q], ex_ids)]))
        )
        own = "–" if check.recall is None else f"{check.recall:.3f}, {check.max_score_error:.4f}"
        print(
            f"| {backend} | {check.backend} {check.reason} | {check.effort or '–'} of {check.nlist or '–'} | {own} "
            f"| {secs:.0f} | {exact_s / secs:.1f}x | {recall:.4f}, {err.max():.4f} / {err.mean():.5f} / "
            f"{np.quantile(err, 0.999):.4f} |",
            flush=True,
        )
    if args.breakdown:
        breakdown(x, k, args.breakdown, q, ex_ids, ex_raw)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


def breakdown(x: np.ndarray, k: int, nprobe: int, q: np.ndarray, ex_ids: np.ndarray, ex_raw: np.ndarray) -> None:
    """Where the partition backend's time and accuracy come from, on the independent sample."""
    from lmmixup_hf.embed.neighbors import build_partition, partition_search, refine_self

    def report(step: str, secs: float, sims: np.ndarray, ids: np.ndarray) -> None:
        err = np.abs((1 - sims[q].astype(np.float64)).mean(1) - ex_raw)
        recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids[q], ex_ids)]))
        print(f"| {step} | {secs:.1f} | {recall:.4f} | {err.max():.4f} | {err.mean():.6f} |", flush=True)

    print(
        f"\npartition at {nprobe} probed cells\n| step | seconds | recall | max error | mean error |\n|---|---:|---:|---:|---:|"
    )
    t = time.perf_counter()
    part = build_partition(x)
    print(f"| k-means cells ({part.nlist}) | {time.perf_counter() - t:.1f} | | | |")
    t = time.perf_counter()
    sims, ids = partition_search(part, x, x, k, nprobe, query_ids=np.arange(x.shape[0]))
    report("search", time.perf_counter() - t, sims, ids)
    for r in (1, 2):
        t = time.perf_counter()
        sims, ids = refine_self(x, sims, ids, rounds=1)
        report(f"refinement round {r}", time.perf_counter() - t, sims, ids)


if __name__ == "__main__":
    main()
