"""Ray's overhead on one machine: each parallel part of the pipeline through the local executor and
through the Ray executor (a private cluster on this machine), on the same rows, with the same
code the stages call.

    python benchmarks/bench_executor.py                     # rate 20k, embed 5k, longtail 100k x 384
    python benchmarks/bench_executor.py --quick             # a smoke run

- rate: the judge against the loopback OpenAI-compatible stub (its own process, fixed latency);
  local runs one judge with ``--in-flight`` requests in flight, Ray ``--actors`` judges with an
  equal share each, so both keep the same number of requests in flight.
- embed: MiniLM (the offline copy) on ``--embed-rows`` texts, no cache; local uses ``--threads``
  torch threads, Ray ``--actors`` actors of one thread each.
- longtail: exact k=15 self-search on synthetic 384-d rows (planted groups); local is the stage's
  symmetric blocked search on ``--threads`` threads, Ray ``--actors`` actors sharing the keys.

The Ray times include starting each part's actor pool (the cluster itself is started once,
before timing), because a stage pays for that every run. The ratio is Ray / local.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the private cluster stays on 127.0.0.1
os.environ.setdefault("OMP_NUM_THREADS", "1")  # per actor; the local runs set their threads below

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_clustering import synthetic  # noqa: E402
from bench_judge import stub_server  # noqa: E402

from lmmixup_hf.embed.embeddings import Embedder, ExecutorEmbedder  # noqa: E402
from lmmixup_hf.execution.base import LocalExecutor  # noqa: E402
from lmmixup_hf.pipeline.executors import make_executor  # noqa: E402
from lmmixup_hf.pipeline.registry import stage  # noqa: E402
from lmmixup_hf.stages.longtail import knn_on, self_knn_sims  # noqa: E402

ONLY: str | None = None  # --only: the side to run; the other is reported as nan


def timed(fn, side: str) -> tuple[float, object]:
    if ONLY and side != ONLY:
        return float("nan"), None
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_rate(ray_exec, rows: int, latency: float, in_flight: int, actors: int) -> dict:
    """The ``rate`` command on a stage folder, as ``lmmixup run`` calls it: locally the judge and
    its per-row checkpoint in this process, on Ray the blocks (workers read, rate and write their
    rows; the driver streams the parts into the output)."""
    import tempfile

    import pyarrow.parquet as pq

    from lmmixup_hf.data.io import read_stage_data
    from lmmixup_hf.pipeline.ingest import IngestArgs, ingest
    from lmmixup_hf.pipeline.rate import RateArgs, rate

    with tempfile.TemporaryDirectory() as tmp, stub_server(latency) as (base_url, _):
        source = Path(tmp) / "pool.parquet"
        pq.write_table(
            pa.table(
                {
                    "id": [f"r{i}" for i in range(rows)],
                    "prompt": [f"Q: benchmark question {i}?" for i in range(rows)],
                    "completion": [f"A: answer {i}." for i in range(rows)],
                    "source": [f"s{i % 3}" for i in range(rows)],
                }
            ),
            source,
        )
        pool = Path(tmp) / "ingest"
        ingest(IngestArgs(input=str(source), out=str(pool)))  # the stage folder rate reads in a run

        def run(executor, side: str) -> None:
            per_actor = in_flight // actors if side == "ray" else in_flight
            args = RateArgs(
                input=str(pool),
                out=str(Path(tmp) / side),
                judge_model="stub-judge",
                base_url=base_url,
                api_key="bench",
                cache_dir="none",
                max_concurrency=per_actor,
                progress=False,
            )
            rate(args, executor=executor)

        t_local, _ = timed(lambda: run(LocalExecutor().for_stage("rate"), "local"), "local")
        t_ray, _ = timed(lambda: run(ray_exec, "ray"), "ray")
        if not ONLY:
            a, b = (read_stage_data(Path(tmp) / side).with_format("arrow")[:] for side in ("local", "ray"))
            scores = {
                side: dict(zip(t["id"].to_pylist(), t["rating"].to_pylist())) for side, t in (("local", a), ("ray", b))
            }
            assert len(scores["local"]) == len(scores["ray"]) == rows and scores["local"] == scores["ray"]
    block = ray_exec.batch_size(stage("rate").part("rate"))
    return {
        "part": "rate",
        "rows": rows,
        "local_s": t_local,
        "ray_s": t_ray,
        "setup": f"the rate command; stub latency {latency * 1000:.0f} ms, {in_flight} in flight "
        f"(Ray: {actors} actors x {in_flight // actors}, blocks of {block} rows)",
    }


def bench_embed(ray_exec, rows: int, threads: int, actors: int) -> dict:
    texts = [f"Instruction {i}: explain topic number {i % 97} in a few words.\nResponse {i}." for i in range(rows)]
    torch.set_num_threads(threads)
    local = Embedder("minilm-offline", cache=False, show_progress=False, batch_size=64)
    if ONLY != "ray":
        _ = local.model  # load outside the timing, as Ray's actors load theirs inside it: the bias is against Ray
    t_local, a = timed(lambda: local.encode(texts), "local")
    part = stage("cluster").part("embed")
    remote = ExecutorEmbedder(ray_exec, part, "minilm-offline", cache=False, show_progress=False, batch_size=64)
    t_ray, b = timed(lambda: remote.encode(texts), "ray")
    assert ONLY or np.allclose(a, b, atol=1e-5)
    return {
        "part": "embed",
        "rows": rows,
        "local_s": t_local,
        "ray_s": t_ray,
        "setup": f"MiniLM, local {threads} threads (model loaded before timing), Ray {actors} actors x 1 thread",
    }


def bench_longtail(ray_exec, rows: int, threads: int, actors: int) -> dict:
    x = synthetic(rows, 384, group=30)
    torch.set_num_threads(threads)
    t_local, a = timed(lambda: self_knn_sims(x, 15), "local")
    search = knn_on(ray_exec, stage("longtail").part("longtail"))
    t_ray, b = timed(lambda: search(x, None, 15), "ray")
    assert ONLY or np.allclose(a, b, atol=1e-5)
    return {
        "part": "longtail",
        "rows": rows,
        "local_s": t_local,
        "ray_s": t_ray,
        "setup": f"exact k=15 self-search, 384-d; local symmetric blocks on {threads} threads, Ray {actors} actors",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["rate", "embed", "longtail"], choices=["rate", "embed", "longtail"])
    p.add_argument("--rate-rows", type=int, default=20000)
    p.add_argument("--embed-rows", type=int, default=5000)
    p.add_argument("--longtail-rows", type=int, default=100000)
    p.add_argument("--latency", type=float, default=0.1, help="the stub judge's seconds per request")
    p.add_argument("--in-flight", type=int, default=64)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the local runs")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the private Ray cluster")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--only",
        choices=["local", "ray"],
        default=None,
        help="run one side only (to time whole processes, Ray's cluster start included, side by side)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: rate 400, embed 200, longtail 4000")
    a = p.parse_args()
    if a.quick:
        a.rate_rows, a.embed_rows, a.longtail_rows = 400, 200, 4000
    global ONLY
    ONLY = a.only
    pools = {"actors": a.actors, "num_cpus": 1}
    ray_exec = make_executor(
        "ray",
        {
            "num_cpus": a.cpus,
            "rate": {**pools},  # blocks of the default size
            "embed": {**pools, "batch_size": 512},
            "longtail": {**pools, "batch_size": 4096},
        },
    ).for_stage("rate")
    if a.only != "local":
        ray_exec.start()  # the cluster, started once
    results = []
    try:
        if "rate" in a.parts:
            results.append(bench_rate(ray_exec, a.rate_rows, a.latency, a.in_flight, a.actors))
        if "embed" in a.parts:
            results.append(bench_embed(ray_exec, a.embed_rows, a.threads, a.actors))
        if "longtail" in a.parts:
            results.append(bench_longtail(ray_exec, a.longtail_rows, a.threads, a.actors))
    finally:
        ray_exec.close()
    print("| part | rows | local s | Ray s | Ray / local | setup |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        r["ratio"] = r["ray_s"] / r["local_s"]
        print(
            f"| {r['part']} | {r['rows']:,} | {r['local_s']:.1f} | {r['ray_s']:.1f} | {r['ratio']:.2f}x | {r['setup']} |"
        )
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
