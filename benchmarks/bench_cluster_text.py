"""Clustering on real text: the bundled sample pool against its generator's topic labels.

The pool (``data/sample_pool.jsonl``) holds topics of one clean row plus 3-5 noisy variants and
clean rows that stand alone; ``data/sample_pool_topics.json`` says which topic each row belongs to.
Runs ``lmmixup cluster --quality all`` (all-MiniLM-L6-v2) with data and drawn sizes and reports
ARI against the topics (rows alone and leftovers as singletons) and the share of clusters whose
members all share one topic.

python benchmarks/bench_cluster_text.py --min-size 2 --max-size 6 --mean-cap 4 --std-cap 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_clustering import adjusted_rand  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from lmmixup_hf.data.io import read_stage_data
    from lmmixup_hf.pipeline.cluster import ClusterArgs, cluster

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--min-size", type=int, default=2)
    ap.add_argument("--max-size", type=int, default=6)
    ap.add_argument("--mean-cap", type=float, default=4.0)
    ap.add_argument("--std-cap", type=float, default=1.0)
    ap.add_argument("--min-cohesion", type=float, nargs="+", default=[0.6])
    ap.add_argument("--model", default="minilm-offline")
    ap.add_argument("--quick", action="store_true", help="drawn and the default floor only")
    args = ap.parse_args()
    if args.quick:
        args.min_cohesion = [0.6]
    topics = json.loads((ROOT / "data" / "sample_pool_topics.json").read_text())
    print("| sizes | min_cohesion | clusters (≥ 2 rows) | rows alone | ARI vs topics | clusters of one topic |")
    print("|---|---|---|---|---|---|")
    runs = [("drawn", None)] + [("data", c) for c in args.min_cohesion]
    for sizes, floor in runs:
        with tempfile.TemporaryDirectory() as tmp:
            ca = ClusterArgs(
                input=str(ROOT / "data" / "sample_pool.jsonl"),
                out=tmp,
                embedding_model=args.model,
                device="cpu",
                quality="all",
                sizes=sizes,
                min_size=args.min_size,
                max_size=args.max_size,
                mean_cap=args.mean_cap,
                std_cap=args.std_cap,
            )
            if floor is not None:
                ca.min_cohesion = floor
            cluster(ca)
            counts = json.loads((Path(tmp) / "manifest.json").read_text())["counts"]
            data, left = read_stage_data(tmp), read_stage_data(tmp, "leftovers")
            alone = set(left["id"])
            ids = list(data["id"]) + [i for i in left["id"] if i not in set(data["id"])]
            labels = [c if i not in alone else -1 for i, c in zip(data["id"], data["cluster_id"])]
            labels += [-1] * (len(ids) - len(labels))
            truth = np.array([topics[i] for i in ids])
            labels = np.array(labels)
            pure = [
                len(set(truth[labels == c])) == 1 and truth[labels == c][0] >= 0
                for c in np.unique(labels[labels >= 0])
            ]
            print(
                f"| {sizes} | {floor if floor is not None else '–'} | {counts['clusters']} | {counts['leftovers']} | "
                f"{adjusted_rand(truth, labels):.3f} | {np.mean(pure):.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
