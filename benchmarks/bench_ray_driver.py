"""The driver's peak memory on Ray as the pool grows: `lmmixup run --to rate` with `executor: ray`.

On Ray the workers read their own blocks of the pool and write their own parts; the driver plans
the blocks from the parquet metadata, collects completion records and streams the parts into the
stage's outputs. Its peak should not grow with the pool. For each pool size: a synthetic pool,
`ingest` in its own process (not measured), then `rate` in a fresh driver process whose own peak
RSS (``ru_maxrss`` of that process: Ray's workers and daemons are other processes) is reported.
The judge is the loopback OpenAI-compatible stub (tests/openai_server.py) in its own process.

    python benchmarks/bench_ray_driver.py --rows 20000 200000      # the figures in docs/benchmarks.md
    python benchmarks/bench_ray_driver.py --rows 2000 20000 --batch-size 500 --small-buffers   # the test's measure
    python benchmarks/bench_ray_driver.py --rows 20000 200000 --root ../before   # another checkout's code
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "tests" / "openai_server.py"
# runs the CLI in this process and reports the process's own peak RSS (KiB on Linux) on stderr
PEAK = (
    "import resource, sys; from lmmixup_hf.cli import main; rc = main(sys.argv[1:]); "
    "print('DRIVER_PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)
# --small-buffers: read batches and written row groups of ~1 MB / 2,048 rows, so a small pool is many
SMALL = (
    "import lmmixup_hf.data.arrow_files as arrow_files, lmmixup_hf.data.stage_io as stage_io; "
    "arrow_files.BATCH_BYTES = stage_io.ROW_GROUP_BYTES = 1 << 20; stage_io.ROW_GROUP_ROWS = 2048; "
)


def write_pool(path: Path, rows: int) -> None:
    """Rows of about 300 characters from three sources."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            row = {
                "id": f"r{i:08d}",
                "prompt": f"Question {i}: explain topic {i % 997} and how it relates to topic {i % 13} in detail.",
                "completion": f"Topic {i % 997} is explained by example {i}; " + "it matters because " * 6,
                "source": ("alpha", "beta", "gamma")[i % 3],
            }
            f.write(json.dumps(row) + "\n")


def config(folder: Path, pool: Path, base_url: str, actors: int, batch_size: int, in_flight: int) -> Path:
    import yaml

    cfg = {
        "name": "ray-driver",
        "input": str(pool),
        "out_dir": str(folder / "run"),
        "executor": "ray",
        "ray": {"num_cpus": actors, "rate": {"actors": actors, "batch_size": batch_size}},
        "rate": {
            "engine": "openai",
            "base_url": base_url,
            "judge_model": "stub-judge",
            "cache_dir": "none",
            "max_concurrency": in_flight,
            "progress": False,
        },
        "distill": {"engine": "openai", "model": "stub-distiller", "base_url": base_url},  # required, not run
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def driver_peak(cfg: Path, env: dict, root: Path, small: bool) -> tuple[float, float, int]:
    """(peak RSS MiB of the rate driver, seconds, rows rated)."""
    cmd = [sys.executable, "-c", (SMALL if small else "") + PEAK, "run", "--config", str(cfg), "--to", "rate"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"rate failed ({r.returncode}):\n{r.stderr[-3000:]}")
    kb = next(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("DRIVER_PEAK_KB"))
    manifest = json.loads((cfg.parent / "run" / "rate" / "manifest.json").read_text())
    return kb / 1024, seconds, manifest["counts"]["rated"]


def measure(rows: int, base_url: str, actors: int, batch_size: int, in_flight: int, root: Path, small: bool) -> dict:
    env = {**os.environ, "OPENAI_API_KEY": "bench", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pool = folder / "pool.jsonl"
        write_pool(pool, rows)
        cfg = config(folder, pool, base_url, actors, batch_size, in_flight)
        ingest = subprocess.run(
            [sys.executable, "-m", "lmmixup_hf.cli", "run", "--config", str(cfg), "--to", "ingest"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        if ingest.returncode != 0:
            raise SystemExit(f"ingest failed:\n{ingest.stderr[-3000:]}")
        peak, seconds, rated = driver_peak(cfg, env, root, small)
    return {"rows": rows, "rated": rated, "driver_peak_mib": round(peak, 1), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per block (ray.rate.batch_size)")
    parser.add_argument("--in-flight", type=int, default=64, help="requests in flight per actor")
    parser.add_argument("--small-buffers", action="store_true", help="~1 MB / 2,048-row batches and row groups")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code runs (default: this one)")
    args = parser.parse_args()
    stub = subprocess.Popen([sys.executable, str(STUB)], stdout=subprocess.PIPE, text=True)
    try:
        base_url = stub.stdout.readline().strip()
        for rows in args.rows:
            result = measure(
                rows, base_url, args.actors, args.batch_size, args.in_flight, args.root.resolve(), args.small_buffers
            )
            print(json.dumps(result), flush=True)
    finally:
        stub.kill()
        stub.wait()


if __name__ == "__main__":
    main()
