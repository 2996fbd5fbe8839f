"""The generic executors: a stage declared from outside the package (a toy that upper-cases a
column) runs on the local and the Ray executor with nothing added to `lmmixup_hf.execution`, and
the pipeline's wiring, pools and report folders come from the one stage declaration."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lmmixup_hf.execution.base import LocalExecutor, Part, PoolOptions, groups
from lmmixup_hf.pipeline.registry import FOLDER_STAGES, RUN_INPUT, STAGES, Stage, parts, stage

# -- the toy stage: a batch function (the stage's own), a command, and its declaration ----------------
SHOUT = Stage(
    "shout",
    __name__,
    "dict",
    "shout",
    "Upper-case the prompts.",
    inputs={"input": "ingest", "reference": RUN_INPUT},
    defaults={"column": "prompt"},
    parts=(Part("shout", 3),),
)


class Upper:
    """The batch function, built once per worker; counts its calls to show it is built once."""

    def __init__(self, column: str):
        self.column, self.calls = column, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        upper = pc.utf8_upper(batch[self.column])
        return batch.set_column(batch.schema.get_field_index(self.column), self.column, upper)


def shout(args: dict, executor) -> pa.Table:
    """The command: read, map the batch function through the executor, write (row order restored)."""
    table = pq.read_table(args["input"]).append_column(
        "row", pa.array(range(pq.read_metadata(args["input"]).num_rows))
    )
    out = pa.concat_tables(executor.map_batches(lambda: Upper(args["column"]), table, SHOUT.parts[0]))
    out = out.sort_by("row").drop_columns(["row"])
    Path(args["out"]).mkdir(parents=True, exist_ok=True)
    pq.write_table(out, Path(args["out"]) / "data.parquet")
    return out


PROMPTS = ["one", "two", "three", "four", "five", "six", "seven"]


def toy_run(tmp_path: Path, executor) -> pa.Table:
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "n": list(range(len(PROMPTS)))}), pool)
    wired = SHOUT.wiring(tmp_path / executor.name, str(pool))
    args = {**SHOUT.defaults, **wired, "input": str(pool)}  # ingest is the pool itself here
    return shout(args, executor.for_stage(SHOUT.name))


def test_a_declared_stage_wires_itself_from_its_declaration(tmp_path):
    wired = SHOUT.wiring(tmp_path, "pool.jsonl")
    assert wired == {"input": str(tmp_path / "ingest"), "reference": "pool.jsonl", "out": str(tmp_path / "shout")}
    assert stage("cluster").wiring("runs/x", "p")["input"] == str(Path("runs/x/split/low"))
    assert stage("report").wiring("runs/x", "p") == {"run_dir": "runs/x"}  # no folder of its own
    # an opt-in stage that is off is skipped by the inputs that name it first
    assert stage("split").wiring("r", "p")["input"] == str(Path("r/curate"))
    assert stage("split").wiring("r", "p", off={"curate"})["input"] == str(Path("r/rate"))
    assert stage("curate").defaults["enabled"] is False
    assert FOLDER_STAGES == tuple(s.name for s in STAGES if s.name != "report")
    assert [p.name for p in parts()] == ["rate", "embed", "cluster", "distill", "rerate", "longtail"]


def test_the_toy_stage_on_the_local_executor(tmp_path):
    out = toy_run(tmp_path, LocalExecutor())
    assert out["prompt"].to_pylist() == [p.upper() for p in PROMPTS]
    assert out["n"].to_pylist() == list(range(len(PROMPTS)))
    assert pq.read_table(tmp_path / "local" / "shout" / "data.parquet").equals(out)


def test_local_map_batches_builds_the_function_once_and_cuts_blocks_of_the_part_size():
    built: list[Upper] = []

    def make() -> Upper:
        built.append(Upper("prompt"))
        return built[-1]

    table = pa.table({"prompt": PROMPTS})
    outs = list(LocalExecutor().map_batches(make, table, Part("shout", 3)))
    assert [t.num_rows for t in outs] == [3, 3, 1] and len(built) == 1 and built[0].calls == 3
    pools = {"shout": PoolOptions(batch_size=5)}
    assert [t.num_rows for t in LocalExecutor(pools).map_batches(make, table, Part("shout", 3))] == [5, 2]
    assert list(LocalExecutor().map_batches(make, table.slice(0, 0), Part("shout"))) == []


def test_local_map_groups_and_share():
    table = pa.table({"k": ["b", "a", "b", "a", "c"], "v": [0, 1, 2, 3, 4]})
    assert [g["v"].to_pylist() for g in groups(table, "k")] == [[1, 3], [0, 2], [4]]
    sums = LocalExecutor().map_groups(lambda g: pa.table({"s": [sum(g["v"].to_pylist())]}), table, "k", Part("g"))
    assert [t["s"][0].as_py() for t in sums] == [4, 2, 4]
    assert LocalExecutor().share([1, 2]).get() == [1, 2]


@pytest.mark.slow
def test_the_toy_stage_on_ray_gives_the_local_rows(tmp_path):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray is imported
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers get the toy stage by value
    from lmmixup_hf.pipeline.executors import make_executor

    executor = make_executor("ray", {"num_cpus": 2})  # no pool configured for `shout`: the defaults
    try:
        on_ray = toy_run(tmp_path, executor)
        table = pa.table({"k": ["b", "a", "b"], "v": [1, 2, 3]})
        sums = executor.map_groups(
            lambda g: pa.table({"k": [g["k"][0]], "s": [pc.sum(g["v"])]}), table, "k", Part("g")
        )
        assert sorted(tuple(r.values()) for t in sums for r in t.to_pylist()) == [("a", 2), ("b", 4)]
        shared = executor.share(list(range(5)))
        got = executor.map_batches(
            lambda: lambda b: b.append_column("x", pa.array([shared.get()[2]] * len(b))), table, Part("s")
        )
        assert pa.concat_tables(got)["x"].to_pylist() == [2, 2, 2]
    finally:
        executor.close()
    assert on_ray.equals(toy_run(tmp_path, LocalExecutor()))
