"""`distill` through blocks (what it does on Ray): blocks of whole clusters, planned from the
``cluster_id`` column alone; workers distil their own clusters and write parts with completion
records; the driver streams the parts into the stage's outputs. Run here on the local executor
declared out of process, so the path is tested without a cluster: the outputs equal the local
path's, and a rerun after failed generations asks only for the failed clusters."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai_server import Faults, server_factory
from test_distill_faults import BROKEN, KEY, N_CLUSTERS, cluster_of, responder, write_clusters
from test_rate_blocks import OutOfProcess

from lmmixup_hf.execution.blocks import BlockFolder, plan_blocks_at
from lmmixup_hf.pipeline.distill import DistillArgs, distill
from lmmixup_hf.pipeline.distill_blocks import BLOCKS, INPUT

_openai_server = pytest.fixture(server_factory, name="openai_server")


def args_for(server, clusters: Path, out: Path, **kw) -> DistillArgs:
    args = DistillArgs(input=str(clusters), out=str(out), model="stub-distiller", engine="openai", **kw)
    args.base_url, args.max_new_tokens, args.max_retries, args.retry_base_delay = server.base_url, 64, 0, 0.01
    args.cache_dir = "none"
    return args


def outputs(out: Path) -> dict:
    lines = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "data": pq.read_table(out / "data").to_pylist(),
        "unparsed": pq.read_table(out / "unparsed").to_pylist(),
        "failed": lines("failed.jsonl"),
        "rejected": lines("rejected.jsonl"),
        "counts": manifest["counts"],
        "complete": manifest["complete"],
    }


def blocks_folder(out: Path) -> BlockFolder:
    return BlockFolder(next((out / ".work").glob(f"*/{BLOCKS}")))


def test_distill_on_blocks_equals_the_local_path_and_reruns_only_failed_clusters(openai_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    clusters = write_clusters(tmp_path / "clusters")
    clean = openai_server(responder)
    distill(args_for(clean, clusters, tmp_path / "local", checkpoint_every=4))
    local = outputs(tmp_path / "local")
    assert local["complete"] and len(local["unparsed"]) == len(BROKEN)

    server = openai_server(responder, faults=Faults(rate_429=0.3, rate_500=0.2, seed=3))
    out = tmp_path / "blocks"
    executor = OutOfProcess({}).for_stage("distill")
    distill(args_for(server, clusters, out, checkpoint_every=4), executor=executor)
    first = outputs(out)
    assert not first["complete"] and first["counts"]["failed"] == len(first["failed"]) > 0
    assert first["counts"]["clusters"] == N_CLUSTERS and len(blocks_folder(out).records()) == 4
    assert not list((out / ".work").glob("*/part-*.parquet"))  # no chunk files of the local path

    for _ in range(20):  # each rerun asks for the failed clusters only, each once
        left = {f["cluster_id"] for f in outputs(out)["failed"]}
        asked_before = len(server.bodies)
        mtimes = {p.name: p.stat().st_mtime_ns for p in blocks_folder(out).path.glob("part-*.parquet")}
        distill(args_for(server, clusters, out, checkpoint_every=4), executor=executor)
        assert sorted(cluster_of(b) for b in server.bodies[asked_before:]) == sorted(left)
        changed = {n for n, t in mtimes.items() if (blocks_folder(out).path / n).stat().st_mtime_ns != t}
        assert changed == {f"part-{c // 4:08d}.parquet" for c in left}  # only the blocks of those clusters
        if outputs(out)["complete"]:
            break
    assert outputs(out) == local  # the same rows, in the same order, as the run that never saw a fault
    n = len(server.bodies)
    distill(args_for(server, clusters, out, checkpoint_every=4), executor=executor)
    assert len(server.bodies) == n  # complete: up to date
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def _shuffled_jsonl(clusters: Path, path: Path) -> Path:
    """The clusters as a hand-made JSONL file: rows shuffled, two leftover rows (cluster_id -1)."""
    rows = pq.read_table(clusters / "data").to_pylist()
    rows += [{**rows[0], "id": f"alone-{i}", "cluster_id": -1} for i in range(2)]
    random.Random(0).shuffle(rows)
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _straddling_folder(clusters: Path, folder: Path) -> Path:
    """The clusters folder as two files, cut inside cluster 5."""
    table = pq.read_table(clusters / "data")
    cut = table["cluster_id"].to_pylist().index(5) + 1
    (folder / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, cut), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(cut), folder / "data" / "train-00001-of-00002.parquet")
    (folder / "manifest.json").write_text(json.dumps({"stage": "cluster", "fingerprint": "test-two-files"}))
    return folder


@pytest.mark.parametrize("make_input", [_shuffled_jsonl, _straddling_folder], ids=["unsorted-jsonl", "two-files"])
def test_an_input_blocks_cannot_read_in_place_is_staged_sorted(openai_server, tmp_path, monkeypatch, make_input):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    source = make_input(write_clusters(tmp_path / "clusters"), tmp_path / "input")
    server = openai_server(responder)
    distill(args_for(server, source, tmp_path / "local", checkpoint_every=3, limit=10))
    out = tmp_path / "blocks"
    distill(args_for(server, source, out, checkpoint_every=3, limit=10), executor=OutOfProcess({}))
    mine = outputs(out)
    assert mine == outputs(tmp_path / "local")
    assert mine["counts"]["clusters"] == 10 and len(blocks_folder(out).records()) == 4  # 3 + 3 + 3 + 1
    assert mine["counts"]["leftover_rows"] == (2 if make_input is _shuffled_jsonl else 0)
    (staged,) = (out / ".work").glob(f"*/{INPUT}/*.parquet")
    cids = pq.read_table(staged, columns=["cluster_id"])["cluster_id"].to_pylist()
    assert cids == sorted(cids)


def test_plan_blocks_at_cuts_where_told_within_a_file(tmp_path):
    files = []
    for i, n in enumerate((5, 4)):
        files.append(tmp_path / f"f{i}.parquet")
        pq.write_table(pa.table({"x": list(range(n))}), files[-1])
    plan = plan_blocks_at(files, [1, 3, 5, 9])
    assert [(b.file, b.offset, b.rows, b.start) for b in plan] == [
        (str(files[0]), 1, 2, 1),
        (str(files[0]), 3, 2, 3),
        (str(files[1]), 0, 4, 5),
    ]
    assert plan[1].done_by({"start": 3, "rows": 2}) and not plan[1].done_by({"start": 3, "rows": 3})
    with pytest.raises(ValueError, match="one file"):
        plan_blocks_at(files, [0, 6])
