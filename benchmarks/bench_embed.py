"""Embedding throughput (texts/s) cold, and the cost of a fully cached rerun.

python benchmarks/bench_embed.py --n 2000 --model minilm-offline --batch-size 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

from lmmixup_hf.embed.embeddings import Embedder

WORDS = (
    "river bridge iron built engineer design city history water boils temperature capital france paris "
    "question answer merge cluster quality sample instruction model data noisy clean fact year"
).split()


def texts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=rng.randint(12, 40))) + f" #{i}" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--model", default="minilm-offline")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 200 if args.quick else args.n
    data = texts(n)
    with tempfile.TemporaryDirectory() as cache:
        e = Embedder(args.model, batch_size=args.batch_size, cache=cache, show_progress=False)
        e.encode(["warm-up"])
        t = time.perf_counter()
        e.encode(data)
        cold = time.perf_counter() - t
        e2 = Embedder(args.model, batch_size=args.batch_size, cache=cache, show_progress=False)
        t = time.perf_counter()
        e2.encode(data)
        warm = time.perf_counter() - t
    print("| model | N | batch | cold texts/s | cached rerun (s) | model calls on rerun |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} | {n:,} | {args.batch_size} | {n / cold:.0f} | {warm:.2f} | {e2.n_encoded} |")


if __name__ == "__main__":
    main()
