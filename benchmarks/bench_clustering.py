"""Clustering: ours against our faithful re-implementation of the reference algorithm.

Synthetic clustered embeddings (planted groups of ~3 around random directions plus noise,
L2-normalised), caps 2/5/3/1 (the method's README example), seed 42. Each (implementation, N)
runs in its own process so that peak RSS is its own.

python benchmarks/bench_clustering.py --sizes 10000 100000 --reference-max 20000

``--planted`` measures quality against known groups instead (:func:`planted_groups`: groups of 2-6
rows with within-group cosine ~0.85 and 10% isolated rows): cohesion, ARI, leftover share and size
histogram for ``sizes: data`` and ``sizes: drawn``.

python benchmarks/bench_clustering.py --planted --sizes 30000 --impls data drawn
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


def planted_groups(
    n: int, d: int, *, sizes: tuple[int, int] = (2, 6), within: float = 0.85, isolated: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Rows in planted groups of ``sizes[0]..sizes[1]`` members whose pairwise cosine is about
    ``within``, plus an ``isolated`` share of rows alone; unrelated rows are near-orthogonal.
    Returns ``(x, group)`` with ``group = -1`` for isolated rows."""
    rng = np.random.default_rng(seed)
    n_iso = int(round(n * isolated))
    counts = rng.integers(sizes[0], sizes[1] + 1, (n - n_iso) // sizes[0] + 1)
    counts = counts[: int(np.searchsorted(np.cumsum(counts), n - n_iso)) + 1]
    counts[-1] -= int(counts.sum()) - (n - n_iso)
    group = np.concatenate([np.repeat(np.arange(len(counts)), counts), np.full(n_iso, -1)])
    centre = rng.standard_normal((len(counts) + n_iso, d), dtype=np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    own = np.where(group >= 0, group, len(counts) + np.arange(n) - (n - n_iso))
    noise = rng.standard_normal((n, d), dtype=np.float32) * np.float32(np.sqrt((1 / within - 1) / d))
    x = centre[own] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return x[perm], group[perm]


def adjusted_rand(truth: np.ndarray, labels: np.ndarray) -> float:
    """ARI with every ``-1`` (isolated row, leftover) as a singleton of its own."""

    def singletons(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.int64).copy()
        neg = v < 0
        v[neg] = v.max(initial=0) + 1 + np.arange(int(neg.sum()))
        return v

    def pairs(c: np.ndarray) -> float:
        c = c.astype(np.float64)
        return float((c * (c - 1) / 2).sum())

    t, p = singletons(truth), singletons(labels)
    _, joint = np.unique(t * (p.max() + 1) + p, return_counts=True)
    a, b = pairs(np.bincount(t)), pairs(np.bincount(p))
    expected = a * b / (len(t) * (len(t) - 1) / 2)
    top = (a + b) / 2
    return 1.0 if top == expected else (pairs(joint) - expected) / (top - expected)


def one_planted(impl: str, n: int, d: int) -> dict:
    """``impl`` in ``data`` / ``drawn`` on :func:`planted_groups` rows, scored against the groups."""
    from lmmixup_hf.stages.cluster import capacity_cluster, cohesion, data_cluster

    x, group = planted_groups(n, d)
    t = time.perf_counter()
    labels = (data_cluster if impl == "data" else capacity_cluster)(x, **CAPS).labels
    secs = time.perf_counter() - t
    sizes = np.bincount(labels[labels >= 0])
    sizes = sizes[sizes > 0]
    coh = cohesion(x, labels)
    return {
        "impl": impl,
        "n": n,
        "seconds": round(secs, 2),
        "cohesion": round(float(np.nanmean(coh[np.bincount(labels[labels >= 0]) >= 2])), 4),
        "ari": round(adjusted_rand(group, labels), 4),
        "leftover_share": round(float(np.mean(labels < 0)), 4),
        "histogram": {int(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


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
    ap.add_argument("--planted", action="store_true", help="quality against planted groups (data vs drawn)")
    ap.add_argument("--impls", nargs="+", default=["data", "drawn"], help="with --planted: data and/or drawn")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="planted groups, 3,000 rows, 256-d, both size modes")
    args = ap.parse_args()
    if args.quick:
        args.planted, args.sizes, args.dim = True, [3000], 256
    if args.one:
        impl, n = args.one[0], int(args.one[1])
        print(json.dumps(one_planted(impl, n, args.dim) if args.planted else one(impl, n, args.dim)))
        return
    if args.planted:
        print("| N | d | sizes | seconds | cohesion | ARI | leftovers | size histogram | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in args.sizes:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--planted", "--dim", str(args.dim), "--one", impl, str(n)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                hist = " ".join(f"{k}:{v:,}" for k, v in r["histogram"].items())
                print(
                    f"| {n:,} | {args.dim} | {impl} | {r['seconds']} | {r['cohesion']} | {r['ari']} | "
                    f"{r['leftover_share']:.1%} | {hist} | {r['peak_rss_mib']:,} |",
                    flush=True,
                )
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
