"""`lmmixup distill` end to end: clusters in, parsed distillation rows out, resumable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai_server import openai_server  # noqa: F401  (fixture)

from lmmixup_hf.data.io import read_stage_data
from lmmixup_hf.distiller.prompts import format_target
from lmmixup_hf.distiller.response_parsing import parse_response
from lmmixup_hf.pipeline.distill import DistillArgs, distill
from lmmixup_hf.stages.distill import group_clusters

ROOT = Path(__file__).resolve().parents[1]

CLUSTERS = [
    # (id, cluster_id, prompt, completion, source, task_type)
    ("d3", 0, "when was the riverton bridge built", "1890s i think", "dolly", "qa"),
    ("d1", 0, "Riverton bridge made of?", "iron", "dolly", "qa"),
    ("d2", 0, "who desgned the riverton bridge", "some engineer, Hale", "dolly", "qa"),
    ("d4", 1, "what is a tulip", "a flower", "dolly", "qa"),
    ("d5", 1, "where do tulips come from", "central asia, later the netherlands", "dolly", "qa"),
    ("o1", 2, "capital of france?", "paris", "oasst1", "qa"),
    ("o2", 2, "France capital city", "Paris, on the Seine", "oasst1", "qa"),
    ("x1", -1, "a leftover row", "no cluster", "oasst1", "qa"),
]


def write_clusters(folder: Path, rows=CLUSTERS) -> Path:
    """A clusters stage folder as `lmmixup cluster` writes it (data/*.parquet + manifest)."""
    (folder / "data").mkdir(parents=True)
    cols = list(zip(*rows))
    table = pa.table(
        {
            "id": list(cols[0]),
            "cluster_id": pa.array(cols[1], pa.int64()),
            "prompt": list(cols[2]),
            "completion": list(cols[3]),
            "source": list(cols[4]),
            "task_type": list(cols[5]),
        }
    )
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    (folder / "manifest.json").write_text(json.dumps({"stage": "cluster", "fingerprint": "test-clusters"}))
    return folder


def rows_of(out: Path, name: str = "data") -> list[dict]:
    """All rows a stage wrote under ``<out>/<name>/`` (also when there are none)."""
    return pq.read_table(out / name).to_pylist()


def test_group_clusters_orders_members_by_id_and_skips_leftovers():
    import numpy as np

    cids = np.array([2, 0, -1, 0, 2, 0])
    ids = np.array(["b", "c", "z", "a", "a", "b"])
    groups = [(c, ids[idx].tolist()) for c, idx in group_clusters(cids, ids)]
    assert groups == [(0, ["a", "b", "c"]), (2, ["a", "b"])]


@pytest.mark.slow
def test_distill_smollm2_three_clusters_end_to_end(tmp_path, smollm2_dir):
    """Real generation with SmolLM2-135M on 3 clusters; every cluster is a parsed row or a
    rejected row with a reason, and the manifest reports throughput."""
    clusters = write_clusters(tmp_path / "clusters")
    out = tmp_path / "distilled"
    args = DistillArgs(
        input=str(clusters),
        out=str(out),
        model=smollm2_dir,
        engine="transformers",
        max_new_tokens=48,
        batch_size=3,
        checkpoint_every=2,
    )
    good = distill(args)
    manifest = json.loads((out / "manifest.json").read_text())
    unparsed = read_stage_data(out, "unparsed")
    assert manifest["counts"]["clusters"] == 3 and manifest["counts"]["leftover_rows"] == 1
    assert len(good) + len(unparsed) == 3
    assert manifest["counts"]["distilled"] == len(good) and manifest["counts"]["unparsed"] == len(unparsed)
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == len(unparsed) and all(r["reason"] for r in rejected)
    rows = list(good) + list(unparsed)
    assert sorted(r["cluster_id"] for r in rows) == [0, 1, 2]
    for r in rows:
        assert r["raw_response"] and 0 < r["completion_tokens"] <= 48 and r["prompt_tokens"] > 50
        again = parse_response(r["raw_response"], "qa")  # the stored parse is the parser's verdict
        assert again.output == r["output"] and again.prompt == r["prompt"]
    by_cluster = {r["cluster_id"]: r for r in rows}
    assert by_cluster[0]["member_ids"] == ["d1", "d2", "d3"]  # id order
    assert by_cluster[0]["input"].startswith("Q: Riverton bridge made of?\nA: iron\n\nQ: who desgned")
    assert by_cluster[2]["source"] == "oasst1" and by_cluster[2]["id"] == "mixup-oasst1-2"
    tp = manifest["throughput"]
    assert tp["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert tp["completion_tokens_per_s"] > 0 and tp["rows_per_s"] > 0
    assert manifest["engine"]["engine"] == "transformers" and manifest["engine"]["dtype"] == "float32"


def test_distill_resumes_from_finished_chunks(tmp_path, tiny_qwen_dir):
    clusters = write_clusters(tmp_path / "clusters")
    out = tmp_path / "distilled"
    args = DistillArgs(input=str(clusters), out=str(out), model=tiny_qwen_dir, max_new_tokens=8, checkpoint_every=1)
    first = distill(args)
    work = next((out / ".work").iterdir())
    parts = sorted(work.glob("part-*.parquet"))
    assert len(parts) == 3
    # simulate an interruption after two chunks: drop the manifest and the last chunk
    (out / "manifest.json").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts[:2]}
    parts[2].unlink()
    second = distill(args)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(work.glob("part-*.parquet"))[:2]} == mtimes
    assert (work / parts[2].name).exists()
    assert len(first) == len(second)
    total = json.loads((out / "manifest.json").read_text())["counts"]
    assert total["distilled"] + total["unparsed"] == 3
    # a finished stage is skipped outright
    assert len(distill(args)) == len(second)


def test_over_budget_members_are_dropped_and_reported(tmp_path, tiny_qwen_dir):
    long = "word " * 300
    rows = [
        ("a", 0, "short question", "short answer", "s", "qa"),
        ("b", 0, long, long, "s", "qa"),
        ("c", 1, long * 3, long, "s", "qa"),
    ]
    clusters = write_clusters(tmp_path / "clusters", rows)
    out = tmp_path / "distilled"
    distill(
        DistillArgs(input=str(clusters), out=str(out), model=tiny_qwen_dir, max_new_tokens=4, max_prompt_tokens=400)
    )
    manifest = json.loads((out / "manifest.json").read_text())
    allrows = {r["cluster_id"]: r for r in rows_of(out, "unparsed") + rows_of(out)}
    assert allrows[0]["member_ids"] == ["a"] and allrows[0]["n_dropped_members"] == 1
    assert allrows[1]["finish_reason"] == "skipped" and "over the prompt budget" in allrows[1]["parse_error"]
    assert manifest["counts"]["members_dropped"] == 2


def test_distill_cli_with_openai_engine(tmp_path, openai_server):  # noqa: F811
    """The real entry point: `lmmixup distill --engine openai` against a loopback server; the key
    is used but never written."""
    answers = {
        "Riverton": format_target(
            "Q: When was the iron Riverton Bridge built, and by whom?\nA: In the 1890s, by Hale.", "merge"
        ),
        "tulip": format_target(
            "Q: What is a tulip and where does it come from?\nA: A flower from Central Asia.", "merge"
        ),
        "France": "I cannot follow the format.",
    }

    def responder(body):
        user = body["messages"][-1]["content"]
        return next(v for k, v in answers.items() if k in user)

    server = openai_server(responder)
    clusters = write_clusters(tmp_path / "clusters")
    out = tmp_path / "distilled"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-secret-123", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lmmixup_hf.cli",
        "distill",
        "--input",
        str(clusters),
        "--out",
        str(out),
        "--model",
        "stub-model",
        "--engine",
        "openai",
        "--base_url",
        server.base_url,
        "--max_new_tokens",
        "128",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    good = read_stage_data(out)
    assert sorted(good["cluster_id"]) == [0, 1]
    row = next(r for r in good if r["cluster_id"] == 0)
    assert row["prompt"] == "When was the iron Riverton Bridge built, and by whom?"
    assert row["completion"] == "In the 1890s, by Hale." and row["think"] == "merge"
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejected] == ["no <answer> tag"]
    assert server.authorization == {"Bearer sk-test-secret-123"}
    assert all(b["temperature"] == 0 and b["stop"] == ["</answer>"] for b in server.bodies)
    for f in out.rglob("*"):
        if f.is_file():
            assert b"sk-test-secret-123" not in f.read_bytes(), f
    assert "sk-test-secret-123" not in proc.stderr + proc.stdout


class _ScriptedEngine:
    """Returns fixed responses in cluster order, with a finish reason, to test how the stage judges them."""

    def __init__(self, tokenizer_dir: str, replies: list[tuple[str, str]]):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.replies = replies

    def describe(self):
        return {"engine": "scripted"}

    def flush(self):  # the Engine protocol's: nothing buffered here
        pass

    def generate(self, conversations, **kwargs):
        from lmmixup_hf.distiller.engines import Generation

        return [Generation(text, 10, 20, reason) for text, reason in self.replies[: len(conversations)]]


def test_answers_cut_at_the_budget_are_rejected_unless_complete(tmp_path, tiny_qwen_dir):
    head = "<think>\nmerge\n</think>\n\n<answer>\n"
    replies = [
        (head + "Q: When was it built?\nA: In the 18", "length"),  # cut mid-answer: rejected
        (head + "Q: What is a tulip?\nA: A flower.\n\nQ: Where from", "length"),  # first pair complete: kept
        (head + "Q: Capital of France?\nA: Paris.\n</answer>", "stop"),
    ]
    out = tmp_path / "out"
    args = DistillArgs(input=str(write_clusters(tmp_path / "clusters")), out=str(out), model="scripted")
    distill(args, engine=_ScriptedEngine(tiny_qwen_dir, replies))
    kept = {r["cluster_id"]: r for r in rows_of(out)}
    rejected = {r["cluster_id"]: r for r in rows_of(out, "unparsed")}
    assert rejected[0]["parse_error"] == "truncated at max_new_tokens (the answer was cut off)"
    assert (kept[1]["prompt"], kept[1]["completion"]) == ("What is a tulip?", "A flower.")
    assert kept[2]["completion"] == "Paris." and kept[2]["member_ids"] == ["o1", "o2"]


def test_distill_rows_core_in_memory(tmp_path, tiny_qwen_dir):
    """The core over an in-memory clustered Dataset: no files, one record per cluster."""
    from datasets import Dataset

    from lmmixup_hf.stages.distill import distill_rows

    head = "<think>\nmerge\n</think>\n\n<answer>\n"
    replies = [
        (head + "Q: When was it built?\nA: In the 18", "length"),
        (head + "Q: What is a tulip?\nA: A flower.\n</answer>", "stop"),
        (head + "Q: Capital of France?\nA: Paris.\n</answer>", "stop"),
    ]
    names = ("id", "cluster_id", "prompt", "completion", "source", "task_type")
    clustered = Dataset.from_list([dict(zip(names, row)) for row in CLUSTERS])
    distilled, unparsed = distill_rows(clustered, _ScriptedEngine(tiny_qwen_dir, replies))
    assert sorted(distilled["cluster_id"]) == [1, 2] and unparsed["cluster_id"] == [0]
    assert {r["cluster_id"]: r["completion"] for r in distilled} == {1: "A flower.", 2: "Paris."}
    assert not any(tmp_path.iterdir())
