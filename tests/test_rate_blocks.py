"""`rate` through blocks (what it does on Ray): workers read their own rows and write parts with
completion records; the driver streams the parts into the stage's outputs. Run here on the local
executor declared out of process, so the path is tested without a cluster: the outputs equal the
per-row path's, a rerun skips completed blocks and re-asks only failed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Dataset
from openai_server import judge_responder, last_user_text, server_factory

from lmmixup_hf.data.io import read_stage_data, write_stage_data
from lmmixup_hf.execution.base import LocalExecutor, PoolOptions
from lmmixup_hf.execution.blocks import BlockFolder
from lmmixup_hf.pipeline.rate import RateArgs, rate
from lmmixup_hf.pipeline.rate_blocks import BLOCKS

_openai_server = pytest.fixture(server_factory, name="openai_server")
KEY = "sk-test-rate-blocks-DO-NOT-WRITE"


class OutOfProcess(LocalExecutor):
    """The local executor, declared out of process: ``rate`` takes its cluster path (blocks)."""

    name = "blocks-here"
    in_process = False

    def for_stage(self, stage: str) -> OutOfProcess:
        return OutOfProcess(self.pools, stage)


def stage_pool(folder: Path, n: int = 22) -> list[dict]:
    """A stage folder with a ``notes`` column: row 3's is empty (nothing to rate with
    ``--fields prompt,notes``), row 7's is unparseable for the judge, row 12's fails until fixed."""
    rows = []
    for i in range(n):
        notes = {3: "", 7: "UNPARSEABLE note", 12: "FLAKY note"}.get(i, f"note {i * 5 % 7}")
        rows.append(
            {
                "id": f"r{i:03d}",
                "prompt": f"Question {i}: name topic {i * 3 % 11}.",
                "completion": f"Topic {i}.",
                "source": ("a", "b", "c")[i % 3],
                "task_type": "qa",
                "notes": notes,
            }
        )
    write_stage_data(Dataset.from_list(rows), folder)
    return rows


def args_for(server, pool: Path, out: Path, **kw) -> RateArgs:
    kw = {"fields": "prompt,notes", **kw}
    return RateArgs(
        input=str(pool),
        out=str(out),
        judge_model="stub-judge",
        base_url=server.base_url,
        api_key=KEY,
        cache_dir=str(out.parent / "cache"),
        retry_base_delay=0.001,
        max_retries=1,
        progress=False,
        **kw,
    )


def outputs(out: Path) -> dict:
    lines = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "data": read_stage_data(out).to_list(),
        "failed": lines("failed.jsonl"),
        "rejected": lines("rejected.jsonl"),
        "summary": json.loads((out / "summary.json").read_text()),
        "counts": manifest["counts"],
        "complete": manifest["complete"],
        "n_requests": manifest["usage"]["n_requests"],
    }


@pytest.fixture
def flaky_server(openai_server):
    state = {"flaky": True}

    def responder(body: dict):
        if state["flaky"] and "FLAKY" in last_user_text(body):
            return {"status": 503, "message": "overloaded"}
        return judge_responder(body)

    server = openai_server(responder, latency=0.002)
    return server, state


def test_rate_on_blocks_equals_the_per_row_path_and_reruns_only_what_failed(flaky_server, tmp_path):
    server, state = flaky_server
    pool = tmp_path / "pool"
    stage_pool(pool)
    rate(args_for(server, pool, tmp_path / "local" / "rate"))
    blocks = OutOfProcess({"rate": PoolOptions(batch_size=4)}).for_stage("rate")
    out = tmp_path / "blocks" / "rate"
    rate(args_for(server, pool, out), executor=blocks)

    local, mine = outputs(tmp_path / "local" / "rate"), outputs(out)
    assert mine == local
    assert [f["id"] for f in mine["failed"]] == ["r007", "r012"] and mine["complete"] is False
    assert [(r["line"], r["reason"]) for r in mine["rejected"]] == [
        (4, "cannot rate: field 'notes' is missing or empty")
    ]
    assert len(mine["data"]) == 22 - 3 and mine["counts"]["rows"] == 21
    folder = BlockFolder(next((out / ".work").glob(f"*/{BLOCKS}")))
    assert len(folder.records()) == 6  # 22 rows in blocks of 4
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    # the rerun runs the blocks with failed rows only, keeping their ok ratings: two rows asked again
    state["flaky"] = False
    before = dict(server.calls_by_key)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.path.glob("part-*.parquet")}
    rate(args_for(server, pool, out), executor=blocks)
    asked = {k: n - before.get(k, 0) for k, n in server.calls_by_key.items() if n > before.get(k, 0)}
    assert len(asked) == 2  # r007 (still unparseable, with its retries) and r012
    changed = sorted(n for n, t in mtimes.items() if (folder.path / n).stat().st_mtime_ns != t)
    assert changed == ["part-00000001.parquet", "part-00000003.parquet"]  # rows 7 and 12's blocks
    again = outputs(out)
    assert [f["id"] for f in again["failed"]] == ["r007"] and len(again["data"]) == 20
    assert [r["id"] for r in again["data"]] == sorted(r["id"] for r in again["data"])  # input order


def test_a_jsonl_input_is_staged_as_parquet_with_its_quarantine_and_limit(openai_server, tmp_path):
    server = openai_server(judge_responder)
    pool = tmp_path / "pool.jsonl"
    lines = [json.dumps({"id": f"j{i}", "prompt": f"Q{i}?", "completion": f"A{i}.", "notes": "n"}) for i in range(9)]
    lines.insert(2, '{"id": "broken", "prompt": ')  # a line the reader rejects
    pool.write_text("\n".join(lines) + "\n")
    common = dict(fields="prompt,completion", limit=6)
    rate(args_for(server, pool, tmp_path / "local" / "rate", **common))
    out = tmp_path / "blocks" / "rate"
    blocks = OutOfProcess({"rate": PoolOptions(batch_size=4)}).for_stage("rate")
    rate(args_for(server, pool, out, **common), executor=blocks)
    mine = outputs(out)
    assert mine == outputs(tmp_path / "local" / "rate")
    assert [r["id"] for r in mine["data"]] == [f"j{i}" for i in range(6)] and len(mine["rejected"]) == 1
    staged = list((out / ".work").glob("*/input/*.parquet"))
    assert len(staged) == 1 and pa.parquet.read_metadata(staged[0]).num_rows == 6
