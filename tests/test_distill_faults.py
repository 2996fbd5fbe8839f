"""Distill (and the chain around it) against a server that fails a large share of its requests.

A generation that failed for a reason outside the reply (429, 5xx, a garbled body) is no verdict on
the cluster: it goes to `failed.jsonl`, the stage is partial (exit 3) and the next run asks again
for those clusters only. A reply that arrived but cannot be parsed is final (`unparsed/`, quarantined
with its reason). The server's request log shows what each rerun asked for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from openai_server import Faults, last_user_text, server_factory

from lmmixup_hf.cli import EXIT_OK, EXIT_PARTIAL, main
from lmmixup_hf.distiller.prompts import format_target

_openai_server = pytest.fixture(server_factory, name="openai_server")

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-distill-faults-91c2"
N_CLUSTERS = 16
BROKEN = {3, 11}  # clusters whose reply arrives but has no <answer>: unparsed, final


def write_clusters(folder: Path) -> Path:
    """A clusters folder: N_CLUSTERS clusters of 2-3 members, each member tagged with its cluster."""
    rows = [
        {
            "id": f"m{c:02d}-{j}",
            "cluster_id": c,
            "prompt": f"[c{c:02d}] question {j} about {'BROKEN ' if c in BROKEN else ''}topic {c}?",
            "completion": f"answer {j} on topic {c}",
            "source": "dolly",
            "task_type": "qa",
        }
        for c in range(N_CLUSTERS)
        for j in range(2 + c % 2)
    ]
    (folder / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(rows).set_column(
        1, "cluster_id", pa.array([r["cluster_id"] for r in rows], pa.int64())
    )
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    (folder / "manifest.json").write_text(json.dumps({"stage": "cluster", "fingerprint": "test-clusters"}))
    return folder


def cluster_of(body: dict) -> int:
    return int(re.search(r"\[c(\d\d)\]", last_user_text(body)).group(1))


def responder(body: dict) -> str:
    c = cluster_of(body)
    if c in BROKEN:
        return "I cannot follow the format."
    return format_target(f"Q: What about topic {c}?\nA: Answer {c}.", f"merged cluster {c}")


def distill_argv(clusters: Path, out: Path, base_url: str) -> list[str]:
    return [
        "distill",
        "--input",
        str(clusters),
        "--out",
        str(out),
        "--model",
        "stub-distiller",
        "--engine",
        "openai",
        "--base_url",
        base_url,
        "--max_new_tokens",
        "64",
        "--checkpoint_every",
        "4",
        "--max_retries",
        "0",
        "--retry_base_delay",
        "0.01",
    ]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def data_rows(folder: Path, name: str = "data") -> list[dict]:
    return pq.read_table(folder / name).to_pylist()


def test_distill_reruns_only_the_failed_clusters_until_complete(openai_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    clusters = write_clusters(tmp_path / "clusters")
    faults = Faults(rate_429=0.25, rate_500=0.2, rate_malformed=0.1, seed=7)
    server = openai_server(responder, faults=faults)
    out = tmp_path / "distill"
    argv = distill_argv(clusters, out, server.base_url)

    assert main(argv) == EXIT_PARTIAL
    m = manifest(out)
    assert not m["complete"] and "clusters failed" in m["incomplete"]
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "partial:" in x]
    assert line.replace(str(out), "").count("rerun") == 1, line
    assert f"{m['counts']['failed']} of {N_CLUSTERS} clusters failed" in line
    assert set(server.faults_sent) >= {"429", "500"}
    failed = jsonl(out / "failed.jsonl")
    assert len(failed) == m["counts"]["failed"] >= N_CLUSTERS // 4
    assert all(
        re.match(r"generation failed: (RateLimitError|InternalServerError|JSONDecodeError)", f["error"])
        for f in failed
    )
    rejected = jsonl(out / "rejected.jsonl")  # the final quarantine: only replies that arrived
    assert all("generation failed" not in r["reason"] for r in rejected)
    assert {json.loads(r["raw"])["cluster_id"] for r in rejected} <= BROKEN

    rounds = 0
    while True:
        asked_before = len(server.bodies)
        left = {f["cluster_id"] for f in jsonl(out / "failed.jsonl")}
        status = main(argv)
        rounds += 1
        asked = [cluster_of(b) for b in server.bodies[asked_before:]]
        assert sorted(asked) == sorted(left)  # only the failed clusters, each once (no retries inside)
        if status == EXIT_OK:
            break
        assert status == EXIT_PARTIAL and rounds < 20

    m = manifest(out)
    assert m["complete"] and "incomplete" not in m
    c = m["counts"]
    assert (c["distilled"], c["unparsed"], c["failed"]) == (N_CLUSTERS - len(BROKEN), len(BROKEN), 0)
    assert (out / "failed.jsonl").read_text() == ""
    assert {r["cluster_id"] for r in data_rows(out, "unparsed")} == BROKEN
    assert all(r["raw_response"] == "I cannot follow the format." for r in data_rows(out, "unparsed"))
    reasons = {json.loads(r["raw"])["cluster_id"]: r["reason"] for r in jsonl(out / "rejected.jsonl")}
    assert reasons == dict.fromkeys(BROKEN, "no <answer> tag")

    # the same rows, in the same order, as a run that never saw a fault
    clean = openai_server(responder)
    assert main(distill_argv(clusters, tmp_path / "clean", clean.base_url)) == EXIT_OK
    key = lambda r: (r["id"], r["cluster_id"], r["prompt"], r["completion"], r["member_ids"])  # noqa: E731
    assert [key(r) for r in data_rows(out)] == [key(r) for r in data_rows(tmp_path / "clean")]

    n = len(server.bodies)  # complete: a rerun asks nothing, also with other retry settings
    assert main(argv) == EXIT_OK and len(server.bodies) == n
    assert main([*argv, "--max_retries", "3", "--retry_base_delay", "0.5"]) == EXIT_OK and len(server.bodies) == n


def test_retry_options_reach_the_openai_client():
    from lmmixup_hf.distiller.engines import make_engine

    engine = make_engine(
        "openai", "stub-distiller", base_url="http://127.0.0.1:9/v1", max_retries=2, retry_base_delay=0.25
    )
    assert (engine.client.max_retries, engine.client.base_delay) == (2, 0.25)


def chain_responder(body: dict) -> str:
    """Judge: a score from the rated text's length. Distiller: the longest member, reworded (so
    that rerate never sends the same request as rate)."""
    system, user = body["messages"][0]["content"], last_user_text(body)
    if "rate the quality" in system:
        overall = min(9, 2 + len(user.split("### ", 2)[-1]) // 45)
        return json.dumps({"rarity": 5, "complexity": 5, "informativeness": overall, "overall": overall})
    members = re.findall(r"^Q: (.*?)\nA: (.*?)(?=\n\nQ: |\Z)", user, flags=re.S | re.M)
    q, a = max(members, key=lambda m: len(m[1]))
    return format_target(f"Q: {q.strip()}\nA: In short: {a.strip()}", f"Kept the fullest of {len(members)} members.")


def test_run_under_faults_stops_at_each_partial_stage_and_completes(openai_server, tmp_path, monkeypatch, minilm_path):
    """`lmmixup run` with judge (rate, rerate) and distiller behind the same faulty server: each run
    stops at the first partial stage; reruns finish the chain, and no answered request is asked twice."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = openai_server(chain_responder, faults=Faults(rate_429=0.25, rate_500=0.25, seed=11))
    sample = (ROOT / "data" / "sample_pool.jsonl").read_text().splitlines(keepends=True)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(sample[:40]))
    served = {"engine": "openai", "base_url": server.base_url, "cache_dir": "none", "max_retries": 1}
    served["retry_base_delay"] = 0.01
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.update(input=str(pool), out_dir=str(tmp_path / "run"), name="faults")
    cfg["rate"] = {**served, "judge_model": "stub-judge", "progress": False}
    cfg["distill"] = {**served, "model": "stub-distiller", "max_new_tokens": 128, "checkpoint_every": 2}
    cfg["mix"] = {"total": 20, "ratio": 0.5, "allow_fewer": True}
    config = tmp_path / "faults.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"

    stopped_at = []
    for _ in range(30):
        status = main(["run", "--config", str(config)])
        if status == EXIT_OK:
            break
        assert status == EXIT_PARTIAL
        (stage,) = json.loads((run_dir / "run.json").read_text())["partial_stages"]
        stopped_at.append(stage)
    assert status == EXIT_OK
    assert {"rate", "distill"} <= set(stopped_at)  # the distill faults stopped the chain like rate's

    d = manifest(run_dir / "distill")
    assert d["complete"] and d["counts"]["failed"] == 0
    assert d["counts"]["distilled"] + d["counts"]["unparsed"] == manifest(run_dir / "cluster")["counts"]["clusters"]
    assert manifest(run_dir / "rerate")["counts"]["rated"] == d["counts"]["distilled"]
    assert max(server.ok_by_key.values()) == 1  # an answered request was never asked again


@pytest.mark.slow
def test_distill_on_ray_reruns_only_the_failed_clusters(openai_server, tmp_path, monkeypatch):
    """The same on Ray actors: a chunk travels with only its failed clusters, and the rows end as
    those of the local run."""
    pytest.importorskip("ray")
    from lmmixup_hf.pipeline.distill import DistillArgs, distill
    from lmmixup_hf.pipeline.executors import make_executor

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    clusters = write_clusters(tmp_path / "clusters")
    server = openai_server(responder, faults=Faults(rate_429=0.3, rate_500=0.3, seed=5))
    args = DistillArgs(input=str(clusters), out=str(tmp_path / "ray"), model="stub-distiller", engine="openai")
    args.base_url, args.max_new_tokens, args.checkpoint_every = server.base_url, 64, 4
    args.max_retries, args.retry_base_delay = 0, 0.01
    executor = make_executor("ray", {"num_cpus": 2, "distill": {"actors": 2}})
    reruns = 0
    try:
        for round_ in range(20):
            left = (
                {f["cluster_id"] for f in jsonl(tmp_path / "ray" / "failed.jsonl")}
                if (tmp_path / "ray").exists()
                else None
            )
            asked_before = len(server.bodies)
            distill(args, executor=executor)
            if left is not None:
                assert sorted(cluster_of(b) for b in server.bodies[asked_before:]) == sorted(left)
                reruns += 1
            if manifest(tmp_path / "ray")["complete"]:
                break
            if round_ == 1:  # a rerun under faults has been checked; each further one costs a new actor pool
                server.faults = Faults()
    finally:
        executor.close()
    assert reruns >= 1 and manifest(tmp_path / "ray")["counts"]["failed"] == 0
    clean = openai_server(responder)
    assert main(distill_argv(clusters, tmp_path / "local", clean.base_url)) == EXIT_OK
    key = lambda r: (r["id"], r["prompt"], r["completion"], r["member_ids"])  # noqa: E731
    assert [key(r) for r in data_rows(tmp_path / "ray")] == [key(r) for r in data_rows(tmp_path / "local")]
