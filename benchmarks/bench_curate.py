"""Score curation at scale: HOC + neighbour voting on planted rows, wall time and peak RSS.

python benchmarks/bench_curate.py --n 300000 --dim 384
python benchmarks/bench_curate.py --quick          # 20k rows, for `make bench`

Rows sit in planted topic groups (``--group`` rows around one random centre, within-group cosine
about 0.8) with one true score per group, drawn from a skewed prior; the judge's scores are the
true ones passed through a known transition matrix (diagonal 0.5-0.7, 60 % of the rest on the
neighbouring scores). Prints the time of each phase (kNN, HOC, voting), the peak RSS, the largest
error of the estimated T, and the agreement of raw and curated scores with the truth.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmmixup_hf.stages.curate import K, curate_scores  # noqa: E402

PRIOR = np.array([0.1, 0.15, 0.25, 0.25, 0.15, 0.1])


def transition(rng: np.random.Generator) -> np.ndarray:
    """Diagonal 0.5-0.7; of the rest, 60 % on the neighbouring scores, 40 % spread over the others."""
    T = np.zeros((K, K))
    for y in range(K):
        d = rng.uniform(0.5, 0.7)
        near = [j for j in (y - 1, y + 1) if 0 <= j < K]
        far = [j for j in range(K) if j != y and j not in near]
        T[y, y], T[y, near], T[y, far] = d, 0.6 * (1 - d) / len(near), 0.4 * (1 - d) / len(far)
    return T


def planted(
    n: int, dim: int, group: int, seed: int = 0, noise: float = 0.5, T: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, true, rated, T)``: float32 unit rows in groups of ``group`` (a random centre plus
    ``noise`` times Gaussian noise; built in place, one n x d array), one true score per group, rated
    through ``T`` (default: :func:`transition`). The curate tests use it too, with tighter groups."""
    rng = np.random.default_rng(seed)
    g = -(-n // group)
    gid = np.arange(n) // group
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= noise
    x += rng.standard_normal((g, dim), dtype=np.float32)[gid]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    true = rng.choice(K, g, p=PRIOR)[gid]
    T = transition(rng) if T is None else T
    rated = (rng.random(n)[:, None] > T.cumsum(1)[true]).sum(1)
    return x, true, rated, T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--group", type=int, default=30)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="20k rows (seconds)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.n = 20_000
    t = time.perf_counter()
    x, true, rated, T = planted(args.n, args.dim, args.group)
    t_data = time.perf_counter() - t
    t = time.perf_counter()
    r = curate_scores(x, rated.astype(np.float64), rounds=args.rounds, backend=args.backend, device=args.device)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
    print(f"N {args.n:,}, d {args.dim}, groups of {args.group}, kNN {r.knn.get('backend')} (asked {args.backend})")
    print(f"data {t_data:.1f} s; curate {wall:.1f} s ({phases}); peak RSS {rss:.2f} GiB")
    print(
        f"max |T - truth| {np.abs(r.T - T).max():.3f}; agreement with the truth: raw {(rated == true).mean():.3f}, "
        f"curated {(r.curated == true).mean():.3f}; changed {r.changed.mean():.3f}, flagged {r.flagged.mean():.3f}"
    )


if __name__ == "__main__":
    main()
