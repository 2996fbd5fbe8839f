"""The data plane: what the non-model stages cost over a plain pyarrow read + write of the same rows.

Two synthetic pools: a text pool (``--rows``, about 700 B a row: prompt, completion, source,
task_type, a ``rating`` struct and a ``long_tail`` float) and an embedding pool (``--emb-rows`` x
``--dim`` ``embedding`` column, planted groups as in bench_clustering, every row rated low).

Per stage: wall time of the stage function (imports excluded), peak RSS of its process, and the
ratio to the baseline: a plain ``pq.read_table`` + ``pq.write_table`` of the stage's input for
ingest, split, filter and mix; the in-process core on in-memory vectors (``cluster_rows``,
``longtail_rows``) for cluster and longtail. Each stage runs in a process of its own, so that
peak RSS is its own (``--quick`` runs them in one process, as a smoke test).

python benchmarks/bench_dataplane.py --rows 1000000 --emb-rows 30000 --dim 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from bench_clustering import synthetic  # noqa: E402

_WORDS = np.array(
    "the a of to and in is that for it as with was on be by this are or from at which an have not "
    "water energy model data river city music history light number system people process language".split()
)


def _sentences(rng: np.random.Generator, n: int, words: int, pool: int = 4096) -> pa.Array:
    """``n`` texts of about ``words`` words, built from a pool of distinct sentences (fast)."""
    base = [" ".join(rng.choice(_WORDS, words)) for _ in range(pool)]
    return pa.array(base).take(pa.array(rng.integers(0, pool, n)))


def text_pool(path: Path, n: int, seed: int = 0) -> None:
    """A rated pool of ``n`` rows, about 700 B each, written in row groups of 128k rows."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        ids = pc.cast(pa.array(np.arange(start, start + m)), pa.string())
        raw = rng.integers(1, 11, m)
        rating = pa.StructArray.from_arrays(
            [
                pa.array(raw),
                pa.array(np.clip(raw, 4, 9) - 4),
                pa.array(np.full(m, "judge-v1", dtype=object), pa.string()),
                pa.array(rng.random(m) * 5),
            ],
            names=["raw", "score", "judge", "expected"],
        )
        table = pa.table(
            {
                "id": pc.binary_join_element_wise("row-", ids, ""),
                "prompt": pc.binary_join_element_wise(_sentences(rng, m, 45), ids, " #"),
                "completion": _sentences(rng, m, 55),
                "source": pa.array(rng.choice(["dolly", "oasst1", "alpaca", "flan"], m)),
                "task_type": pa.array(np.full(m, "qa", dtype=object), pa.string()),
                "rating": rating,
                "long_tail": pa.array(rng.random(m)),
            }
        )
        writer = writer or pq.ParquetWriter(str(path), table.schema)
        writer.write_table(table, row_group_size=128 * 1024)
    writer.close()


def embedding_pool(path: Path, n: int, d: int, seed: int = 0) -> None:
    """``n`` rows with a planted-group ``embedding`` column (float32 lists), every row rated 2 (low)."""
    x = synthetic(n, d, seed=seed)
    rng = np.random.default_rng(seed)
    rating = pa.StructArray.from_arrays([pa.array(np.full(n, 6)), pa.array(np.full(n, 2))], names=["raw", "score"])
    table = pa.table(
        {
            "id": pc.cast(pa.array(np.arange(n)), pa.string()),
            "prompt": _sentences(rng, n, 20),
            "completion": _sentences(rng, n, 25),
            "source": pa.array(rng.choice(["dolly", "oasst1"], n)),
            "rating": rating,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d).cast(pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, path, row_group_size=8192)


def rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _read_write(inputs: list[Path], out: Path) -> None:
    """The baseline: every input read whole with pyarrow and written once."""
    for i, p in enumerate(inputs):
        files = sorted(p.glob("data/*.parquet")) if p.is_dir() else [p]
        pq.write_table(pa.concat_tables([pq.read_table(f) for f in files]), out / f"copy-{i}.parquet")


def run_stage(stage: str, work: Path) -> dict:
    """One stage (or its baseline) in this process: seconds and peak RSS."""
    shutil.rmtree(work / stage, ignore_errors=True)  # a kept --work folder must not skip the stage as done
    t = time.perf_counter()
    text, emb, scratch = work / "pool.parquet", work / "emb.parquet", Path(tempfile.mkdtemp(dir=work))
    if stage == "ingest":
        from lmmixup_hf.pipeline.ingest import IngestArgs, ingest

        t = time.perf_counter()
        ingest(IngestArgs(input=str(text), out=str(work / "ingest")))
    elif stage in ("split", "filter"):
        from lmmixup_hf.pipeline.split import FilterArgs, SplitArgs, filter_rated, split_rated

        t = time.perf_counter()
        if stage == "split":
            split_rated(SplitArgs(input=str(work / "ingest"), out=str(work / "split")))
        else:
            filter_rated(FilterArgs(input=str(work / "ingest"), out=str(work / "filter")))
    elif stage == "mix":
        from lmmixup_hf.pipeline.mix import MixArgs, mix

        t = time.perf_counter()
        high, low = work / "split" / "high", work / "split" / "low"
        total = pq.ParquetFile(next((work / "split" / "high" / "data").glob("*.parquet"))).metadata.num_rows
        mix_args = MixArgs(original=str(high), distilled=str(low), out=str(work / "mix"), total=total, ratio=0.5)
        mix_args.dedup_threshold = None  # the mix of every high row with as many low ones, no model
        mix(mix_args)
    elif stage == "cluster":
        from lmmixup_hf.pipeline.cluster import ClusterArgs, cluster

        t = time.perf_counter()
        cluster(ClusterArgs(input=str(emb), out=str(work / "cluster")))
    elif stage == "cluster-core":
        from datasets import Dataset
        from datasets.table import InMemoryTable

        from lmmixup_hf.stages.cluster import cluster_rows

        table = pq.read_table(emb)
        x = np.array(table.column("embedding").combine_chunks().flatten(), np.float32).reshape(table.num_rows, -1)
        ds = Dataset(InMemoryTable(table.drop_columns(["embedding"])))
        t = time.perf_counter()
        cluster_rows(ds, x)
    elif stage == "longtail":
        from lmmixup_hf.pipeline.longtail import LongtailArgs, longtail

        t = time.perf_counter()
        longtail(LongtailArgs(input=str(emb), reference=str(work / "emb_ref.parquet"), out=str(work / "longtail")))
    elif stage == "longtail-core":
        from datasets import Dataset
        from datasets.table import InMemoryTable

        from lmmixup_hf.stages.longtail import longtail_rows

        def load(p: Path) -> tuple:
            table = pq.read_table(p)
            flat = np.array(table.column("embedding").combine_chunks().flatten(), np.float32)
            return Dataset(InMemoryTable(table.drop_columns(["embedding"]))), flat.reshape(table.num_rows, -1)

        (ds, x), (ref, y) = load(emb), load(work / "emb_ref.parquet")
        t = time.perf_counter()
        longtail_rows(ds, x, ref, y)
    elif stage.startswith("read+write:"):
        inputs = {
            "ingest": [text],
            "split": [work / "ingest"],
            "filter": [work / "ingest"],
            "mix": [work / "split" / "high", work / "split" / "low"],
        }[stage.split(":")[1]]
        t = time.perf_counter()
        _read_write(inputs, scratch)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    seconds = time.perf_counter() - t
    shutil.rmtree(scratch, ignore_errors=True)
    return {"seconds": seconds, "peak_mib": rss_mib()}


STAGES = [
    ("ingest", "read+write:ingest"),
    ("split", "read+write:split"),
    ("filter", "read+write:filter"),
    ("mix", "read+write:mix"),
    ("cluster", "cluster-core"),
    ("longtail", "longtail-core"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000, help="text pool rows")
    ap.add_argument("--emb-rows", type=int, default=30_000, help="embedding pool rows")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--stages", nargs="+", default=[s for s, _ in STAGES])
    ap.add_argument("--work", help="keep the pools and outputs here (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20k rows, 2k x 64 vectors, one process")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_stage(args.one, Path(args.work))))
        return
    if args.quick:
        args.rows, args.emb_rows, args.dim = 20_000, 2_000, 64
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        text_pool(work / "pool.parquet", args.rows)
        embedding_pool(work / "emb.parquet", args.emb_rows, args.dim)
        embedding_pool(work / "emb_ref.parquet", args.emb_rows // 2, args.dim, seed=1)
        size = (work / "pool.parquet").stat().st_size / 2**20
        print(
            f"pools: {args.rows:,} rows ({size:.0f} MiB parquet), {args.emb_rows:,} x {args.dim} embeddings "
            f"(+ {args.emb_rows // 2:,} reference rows); made in {time.perf_counter() - t:.1f} s\n"
        )
        print("| stage | seconds | peak RSS MiB | baseline | baseline seconds | ratio |")
        print("|---|---|---|---|---|---|")
        for stage, base in STAGES:
            if stage not in args.stages:
                continue
            got = [_measure(s, work, args.quick) for s in (stage, base)]
            (st, bt) = got
            print(
                f"| {stage} | {st['seconds']:.1f} | {st['peak_mib']:,} | {base} | {bt['seconds']:.1f} | "
                f"{st['seconds'] / max(bt['seconds'], 1e-9):.2f}x |",
                flush=True,
            )


def _measure(stage: str, work: Path, in_process: bool) -> dict:
    if in_process:
        return run_stage(stage, work)
    cmd = [sys.executable, __file__, "--one", stage, "--work", str(work)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
