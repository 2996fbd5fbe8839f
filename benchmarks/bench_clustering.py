"""Clustering: ours against our faithful re-implementation of the reference algorithm.

Synthetic clustered embeddings (planted groups of ~3 around random directions plus noise,
L2-normalised), caps 2/5/3/1 (the method's README example), seed 42. Each (implementation, N)
runs in its own process so that peak RSS is its own.

python benchmarks/bench_clustering.py --sizes 10000 100000 --reference-max 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CAPS = dict(min_size=2, max_size=5, mean_cap=3.0, std_cap=1.0, seed=42)


def synthetic(n: int, d: int, group: int = 3, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """Planted groups of about ``group`` rows; within-group cosine ~0.8, across ~0."""
    rng = np.random.default_rng(seed)
    n_groups = max(1, n // group)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= noise
    x += rng.standard_normal((n_groups, d), dtype=np.float32)[rng.integers(0, n_groups, n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def one(impl: str, n: int, d: int) -> dict:
    from lmmixup_hf.stages.cluster import capacity_cluster, cohesion

    x = synthetic(n, d)
    t = time.perf_counter()
    if impl == "ours":
        labels = capacity_cluster(x, **CAPS).labels
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from reference_impls import reference_caps, reference_cluster

        labels = reference_cluster(x, reference_caps(n, 2, 5, 3.0, 1.0, 42), seed=42)
    secs = time.perf_counter() - t
    sizes = np.bincount(labels[labels >= 0])
    return {
        "impl": impl,
        "n": n,
        "seconds": round(secs, 2),
        "cohesion": round(float(np.nanmean(cohesion(x, labels))), 4),
        "clusters": int((sizes > 0).sum()),
        "size_range": [int(sizes[sizes > 0].min()), int(sizes.max())],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--reference-max", type=int, default=100_000, help="skip the reference above this N")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.dim)))
        return
    print("| N | implementation | seconds | mean intra-cluster cosine | clusters | sizes | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        results = {}
        for impl in ("ours", "reference"):
            if impl == "reference" and n > args.reference_max:
                continue
            cmd = [sys.executable, __file__, "--dim", str(args.dim), "--one", impl, str(n)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True).stdout
            r = results[impl] = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {n:,} | {impl} | {r['seconds']} | {r['cohesion']} | {r['clusters']:,} | "
                f"{r['size_range'][0]}-{r['size_range'][1]} | {r['peak_rss_mib']:,} |",
                flush=True,
            )
        if len(results) == 2:
            print(
                f"| {n:,} | speed-up | {results['reference']['seconds'] / results['ours']['seconds']:.1f}x | | | | |"
            )


if __name__ == "__main__":
    main()
