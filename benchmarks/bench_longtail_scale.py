"""Long-tail at scale: the self-checked ANN search (tuned effort, sampled recall) against exact.

python benchmarks/bench_longtail_scale.py --n 1000000 --dim 384 --backends ivf auto

For each backend: the search `longtail` runs (``long_tail_checked``), its wall time, what it chose
and tuned (nprobe / efSearch), the recall@k it measured on its own sample of queries, and, as an
independent check, the recall and max score error on ``--sample`` other rows against exact search.
The exact all-vs-all time is measured with ``--exact`` (below ~200k rows on a CPU) or else
estimated from the exact search of the sampled rows.
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
from lmmixup_hf.stages.longtail import long_tail_checked  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--group", type=int, default=30, help="planted group size of the synthetic rows")
    ap.add_argument("--backends", nargs="+", default=["ivf", "auto"])
    ap.add_argument("--sample", type=int, default=1000, help="rows checked independently against exact search")
    ap.add_argument("--exact", action="store_true", help="also time the exact all-vs-all search")
    ap.add_argument("--quick", action="store_true", help="20k rows, measured exact (seconds)")
    args = ap.parse_args()
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
        "| independent sample: recall, max error |"
    )
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends:
        t = time.perf_counter()
        raw, check = long_tail_checked(x, k, backend=backend)
        secs = time.perf_counter() - t
        if check.backend == "exact":
            recall, err = 1.0, float(np.abs(raw[q] - ex_raw).max())
        else:
            # the ids are not returned by the score; recompute them for the checked rows only
            from lmmixup_hf.embed.neighbors import ann_search, build_ann, set_effort

            index = build_ann(x, check.backend)
            set_effort(index, check.backend, check.effort)
            _, ids = ann_search(index, check.backend, x[q], k + 1, False)
            ids = np.stack([row[row != qi][:k] for row, qi in zip(ids, q)])
            recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, ex_ids)]))
            err = float(np.abs(raw[q] - ex_raw).max())
        own = "–" if check.recall is None else f"{check.recall:.3f}, {check.max_score_error:.4f}"
        print(
            f"| {backend} | {check.backend} {check.reason} | {check.effort or '–'} | {own} | {secs:.0f} | "
            f"{exact_s / secs:.1f}x | {recall:.3f}, {err:.4f} |",
            flush=True,
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
