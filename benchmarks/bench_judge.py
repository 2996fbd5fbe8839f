"""Judge throughput (rows/s) against the number of requests in flight, on a loopback
OpenAI-compatible server with a fixed per-request latency (default 200 ms).

    python benchmarks/bench_judge.py --latency 0.2 --in-flight 1 4 16 64 256 --rows-per-slot 4 --repeats 3

With a fixed latency L and C requests in flight the ideal is C / L rows/s; the table shows how
close the client gets. The stub server runs in its own process; on a small machine its CPU time and
the client's compete, so the last column (the client's own CPU per row) is the number to scale from.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from lmmixup_hf.judge.judges import JudgeItem, OpenAIJudge

STUB = Path(__file__).resolve().parents[1] / "tests" / "openai_server.py"


@contextmanager
def stub_server(latency: float):
    """The test stub in its own process, so its threads do not share our interpreter lock."""
    proc = subprocess.Popen([sys.executable, str(STUB), "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip(), proc.pid
    finally:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def bench(latency: float, in_flight: int, rows: int, cache: bool = False) -> dict:
    with stub_server(latency) as (base_url, pid), tempfile.TemporaryDirectory() as cache_dir:
        judge = OpenAIJudge(
            "stub-judge",
            base_url=base_url,
            api_key="bench",
            max_concurrency=in_flight,
            cache_dir=cache_dir if cache else None,  # a fresh cache: every reply is a miss and a write
        )
        judge.rate_many([JudgeItem("warm-up", "qa")], show_progress=False)  # imports, first connection
        items = [JudgeItem(f"Q: benchmark question {i}?\nA: answer {i}.", "qa") for i in range(rows)]
        t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_seconds(pid)
        ratings = judge.rate_many(items, show_progress=False)
        seconds, cpu, server_cpu = time.perf_counter() - t0, time.process_time() - c0, cpu_seconds(pid) - s0
        assert all(r.ok for r in ratings)
        return {
            "in_flight": in_flight,
            "rows": rows,
            "seconds": seconds,
            "rows_per_s": rows / seconds,
            "ideal": in_flight / latency,
            "client_cpu_ms_per_row": 1000 * cpu / rows,
            "server_cpu_ms_per_row": 1000 * server_cpu / rows,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--rows-per-slot", type=int, default=4, help="rows = max(20, in_flight * this)")
    p.add_argument("--repeats", type=int, default=3, help="runs per point; the median by rows/s is shown")
    p.add_argument("--cache", action="store_true", help="with the response cache on (the default of `lmmixup rate`)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 and 16 in flight, one repeat")
    a = p.parse_args()
    if a.quick:
        a.in_flight, a.repeats, a.rows_per_slot = [1, 16], 1, 2
    print(f"latency {a.latency * 1000:.0f} ms per request, response cache {'on' if a.cache else 'off'}\n")
    print("| in flight | rows | seconds | rows/s | ideal rows/s | efficiency | client CPU ms/row | stub CPU ms/row |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in a.in_flight:
        runs = sorted(
            (bench(a.latency, c, max(20, c * a.rows_per_slot), a.cache) for _ in range(a.repeats)),
            key=lambda r: r["rows_per_s"],
        )
        r = runs[len(runs) // 2]  # a shared machine is noisy: the median run
        print(
            f"| {c} | {r['rows']} | {r['seconds']:.2f} | {r['rows_per_s']:.1f} | {r['ideal']:.0f} | "
            f"{r['rows_per_s'] / r['ideal']:.0%} | {r['client_cpu_ms_per_row']:.2f} | {r['server_cpu_ms_per_row']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
