"""Blocks: workers read their own slices of a parquet input and write their own parts with a
completion record each; a rerun skips the completed blocks. A toy block function (upper-case a
column) on the local and the Ray executor."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lmmixup_hf.execution.base import LocalExecutor, Part
from lmmixup_hf.execution.blocks import (
    Block,
    BlockFolder,
    block_records,
    map_blocks,
    plan_blocks,
    read_block,
)

PART = Part("shout", 4)
CALLS = "LMMIXUP_TEST_BLOCK_CALLS"  # a file every process appends the blocks it ran to


def pool(tmp_path: Path) -> list[str]:
    """Two parquet files (10 and 7 rows) in row groups of 3 rows, so blocks straddle row groups."""
    files = []
    for k, n in enumerate((10, 7)):
        path = tmp_path / f"in-{k}.parquet"
        start = 10 * k
        pq.write_table(
            pa.table({"prompt": [f"row {start + i}" for i in range(n)], "n": list(range(start, start + n))}),
            path,
            row_group_size=3,
        )
        files.append(str(path))
    return files


class Shout:
    """The toy block function: upper-case ``prompt``; counts what it ran in the ``CALLS`` file."""

    def __call__(self, rows: pa.Table, block: Block, previous: pa.Table | None) -> tuple[pa.Table, dict]:
        with open(os.environ[CALLS], "a") as f:
            f.write(f"{block.id} {previous is not None}\n")
        out = rows.set_column(0, "prompt", pc.utf8_upper(rows["prompt"]))
        return out, {"upper": out.num_rows}


def calls(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def output(plan: list[Block], folder: Path) -> pa.Table:
    return pa.concat_tables(BlockFolder(folder).read(b.id) for b in plan)


@pytest.fixture
def calls_file(tmp_path, monkeypatch):
    path = tmp_path / "calls.txt"
    monkeypatch.setenv(CALLS, str(path))
    return path


def test_plan_from_metadata_and_read_exactly_the_block(tmp_path):
    files = pool(tmp_path)
    plan = plan_blocks(files, 4)
    assert [(Path(b.file).name, b.offset, b.rows, b.start) for b in plan] == [
        ("in-0.parquet", 0, 4, 0),
        ("in-0.parquet", 4, 4, 4),
        ("in-0.parquet", 8, 2, 8),
        ("in-1.parquet", 0, 4, 10),
        ("in-1.parquet", 4, 3, 14),
    ]
    assert [b.id for b in plan] == [f"{i:08d}" for i in range(5)] and plan == plan_blocks(files, 4)
    assert read_block(plan[1])["n"].to_pylist() == [4, 5, 6, 7]  # rows of two row groups
    assert read_block(plan[4], ["n"]).column_names == ["n"]
    assert [b.rows for b in plan_blocks(files, 4, limit=12)] == [4, 4, 2, 2]


def test_blocks_of_one_row_group_decode_it_once(tmp_path, monkeypatch):
    """A worker's memo: consecutive blocks of the same row group read it once, and still give
    exactly their own rows."""
    import pyarrow.parquet as pq

    path = tmp_path / "one-group.parquet"
    pq.write_table(pa.table({"n": list(range(100))}), path)  # one row group
    reads = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_groups", lambda self, *a, **k: (reads.append(a), original(self, *a, **k))[1]
    )
    memo: dict = {}
    got = [read_block(b, cache=memo)["n"].to_pylist() for b in plan_blocks([path], 10)]
    assert got == [list(range(i, i + 10)) for i in range(0, 100, 10)]
    assert len(reads) == 1
    read_block(plan_blocks([path], 10)[0])  # no memo: read again
    assert len(reads) == 2


def test_toy_stage_on_blocks_then_a_rerun_runs_only_the_missing_blocks(tmp_path, calls_file):
    files, folder = pool(tmp_path), tmp_path / "blocks"
    plan = plan_blocks(files, PART.batch_size)
    records = list(map_blocks(LocalExecutor(), Shout, plan, folder, PART))
    assert sorted(r["block"] for r in records) == [b.id for b in plan]
    assert [r["rows"] for r in block_records(plan, folder)] == [4, 4, 2, 4, 3]
    out = output(plan, folder)
    expected = pa.concat_tables(pq.read_table(f) for f in files)
    assert out["prompt"].to_pylist() == [p.upper() for p in expected["prompt"].to_pylist()]
    assert out["n"].to_pylist() == expected["n"].to_pylist()

    # blocks 1 and 3 lost their records (one was killed between its part and its record), and a
    # kill left a temporary file behind: the rerun runs those two blocks only
    BlockFolder(folder).record(plan[1].id).unlink()
    BlockFolder(folder).record(plan[3].id).unlink()
    (folder / f".part-{plan[2].id}.json.tmp-deadbeef").write_text("{cut sh")
    calls_file.unlink()
    again = list(map_blocks(LocalExecutor(), Shout, plan, folder, PART))
    assert sorted(r["block"] for r in again) == [plan[1].id, plan[3].id]
    assert calls(calls_file) == [f"{plan[1].id} False", f"{plan[3].id} False"]  # redone from scratch
    assert output(plan, folder).equals(out)
    assert list(map_blocks(LocalExecutor(), Shout, plan, folder, PART)) == []  # all complete: nothing runs


def test_redo_hands_the_function_its_previous_part(tmp_path, calls_file):
    files, folder = pool(tmp_path), tmp_path / "blocks"
    plan = plan_blocks(files, 8)
    list(map_blocks(LocalExecutor(), Shout, plan, folder, PART))
    calls_file.unlink()
    redo = list(map_blocks(LocalExecutor(), Shout, plan, folder, PART, redo=lambda r: r["block"] == plan[0].id))
    assert [r["block"] for r in redo] == [plan[0].id] and calls(calls_file) == [f"{plan[0].id} True"]
    record = json.loads(BlockFolder(folder).record(plan[0].id).read_text())
    assert record == {"upper": 8, "block": plan[0].id, "start": 0, "rows": 8}


def test_records_of_another_block_size_are_not_taken(tmp_path, calls_file):
    """The ids are places in a plan: with another block size, id 1 names other rows, so its old
    record completes nothing and its old part is not handed over as ``previous``."""
    files, folder = pool(tmp_path), tmp_path / "blocks"
    list(map_blocks(LocalExecutor(), Shout, plan_blocks(files, 4), folder, PART))
    calls_file.unlink()
    plan = plan_blocks(files, 5)  # 0-4 | 5-9 | 10-14 | 15-16: only block 0 starts where it did (rows differ)
    assert len(list(map_blocks(LocalExecutor(), Shout, plan, folder, PART))) == len(plan)
    assert all(c.endswith(" False") for c in calls(calls_file))
    assert output(plan, folder)["n"].to_pylist() == list(range(17))


def test_a_missing_record_is_a_clear_error(tmp_path, calls_file):
    files, folder = pool(tmp_path), tmp_path / "blocks"
    plan = plan_blocks(files, 8)
    with pytest.raises(RuntimeError, match="3 block"):
        block_records(plan, folder)


@pytest.mark.slow
def test_toy_stage_on_ray_blocks_gives_the_local_parts(tmp_path, calls_file):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray is imported
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from lmmixup_hf.pipeline.executors import make_executor

    files = pool(tmp_path)
    plan = plan_blocks(files, PART.batch_size)
    list(map_blocks(LocalExecutor(), Shout, plan, tmp_path / "local", PART))
    # the user's pool batch size (rows per call of map_batches) does not change rows per block
    executor = make_executor("ray", {"num_cpus": 2, "rate": {"actors": 2, "batch_size": 3}})
    try:
        on_ray = list(map_blocks(executor, Shout, plan, tmp_path / "ray", Part("rate", 4)))
        assert sorted(r["block"] for r in on_ray) == [b.id for b in plan]
        BlockFolder(tmp_path / "ray").record(plan[2].id).unlink()
        assert [r["block"] for r in map_blocks(executor, Shout, plan, tmp_path / "ray", PART)] == [plan[2].id]
    finally:
        executor.close()
    assert output(plan, tmp_path / "ray").equals(output(plan, tmp_path / "local"))
    assert sorted(calls(calls_file)).count(f"{plan[2].id} False") == 3  # local, Ray, Ray's rerun
