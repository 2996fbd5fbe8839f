"""``lmmixup rate --mode batch`` against the loopback server's Batch API (files, batches, polling),
and batch files run elsewhere (``--batch_file_only`` / ``--batch_results``): every row ends scored
or failed, nothing twice, one batch per input file even across SIGKILL, the key never written."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from openai_server import judge_responder, last_user_text, server_factory
from test_rating import KEY, all_bytes, cli, expected_raw, write_pool

from lmmixup_hf.data.io import read_stage_data
from lmmixup_hf.judge import batch as batch_judge
from lmmixup_hf.judge.batch import BatchRunner, BatchState, Chunk, read_results, write_inputs
from lmmixup_hf.judge.judges import JudgeItem
from lmmixup_hf.pipeline.rate import RateArgs, rate

_openai_server = pytest.fixture(server_factory, name="openai_server")

SPECIAL = {
    3: "UNPARSEABLE answer",
    7: "FLAKY answer",
    9: "BATCH_TRUNCATED answer",
    12: "BATCH_NOCHOICES answer",
    15: "BATCH_ERRORLINE answer",
    18: "   ",
}
PRICE = [1.0, 4.0]  # USD per 1M tokens (input, output), synchronous


def batch_args(pool: Path, out: Path, server, tmp_path: Path, **kw) -> RateArgs:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"stub-judge": PRICE}))
    return RateArgs(
        input=str(pool),
        out=str(out),
        judge_model="stub-judge",
        base_url=server.base_url,
        api_key=KEY,
        mode="batch",
        batch_poll_interval=0.01,
        cache_dir=str(tmp_path / "cache"),
        prices=str(prices),
        progress=False,
        **kw,
    )


def failed_of(out: Path) -> dict[str, str]:
    return {f["id"]: f["error"] for f in map(json.loads, (out / "failed.jsonl").read_text().splitlines())}


def test_batch_mode_partial_failures_malformed_replies_and_retry(openai_server, tmp_path, monkeypatch):
    state = {"flaky": True}

    def responder(body: dict) -> dict:
        if state["flaky"] and "FLAKY" in last_user_text(body):
            return {"status": 500, "message": "overloaded"}
        return judge_responder(body)

    server = openai_server(responder, batch_polls=3)
    monkeypatch.setattr(batch_judge, "MAX_REQUESTS", 7)  # 29 requests -> 5 input files, 5 batches
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    rows = write_pool(pool, 30, SPECIAL)
    by_id = {r["id"]: r for r in rows}

    ds = rate(batch_args(pool, out, server, tmp_path))
    assert server.n_batch_creates == 5 and server.n_uploads == 5
    assert all(b["_polls"] >= 3 for b in server.batches.values())  # each took a few polls
    assert set(server.batch_lines.values()) == {1} and len(server.batch_lines) == 29  # nothing asked twice
    assert server.n_requests == 0  # no synchronous request at all

    failed = failed_of(out)
    assert {k: v.split(":")[0] for k, v in failed.items()} == {
        "r003": "unparseable reply",
        "r007": "batch request failed with status 500",
        "r009": "no reply in batch batch_2 (completed)",  # its output line was cut off
        "r012": "the server returned no choices",
        "r015": "batch request failed",
    }
    assert "the batch worker crashed" in failed["r015"]
    rejected = (out / "rejected.jsonl").read_text().splitlines()
    assert len(ds) + len(failed) + len(rejected) == len(rows)  # every row scored, failed or rejected
    for rec in ds:
        raw = expected_raw(by_id[rec["id"]])
        assert rec["rating"]["raw"] == raw and rec["rating"]["expected"] is not None
        assert rec["rating"]["judge"] == "openai:stub-judge"

    manifest = json.loads((out / "manifest.json").read_text())
    usage = manifest["usage"]
    assert usage["mode"] == "batch" and usage["price_per_1m_tokens"] == [p / 2 for p in PRICE]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    expected_cost = (usage["prompt_tokens"] * PRICE[0] + usage["completion_tokens"] * PRICE[1]) / 2e6
    assert usage["cost_usd"] == pytest.approx(expected_cost, rel=1e-4)
    assert manifest["counts"]["failed"] == 5

    # a rerun sends exactly the failed rows, in one new batch; the unparseable one sampled hotter
    state["flaky"] = False
    lines_before = dict(server.batch_lines)
    ds2 = rate(batch_args(pool, out, server, tmp_path))
    assert server.n_batch_creates == 6
    asked = {cid for cid, n in server.batch_lines.items() if n > lines_before.get(cid, 0)}
    assert asked == set(failed)
    hot = [b for b in server.bodies[-len(asked) :] if "UNPARSEABLE" in last_user_text(b)]
    assert hot and hot[0]["temperature"] == 0.7
    assert set(failed_of(out)) == {"r003", "r009", "r012", "r015"}  # r007 now scored
    assert {r["id"]: r["rating"]["raw"] for r in ds2}["r007"] == expected_raw(by_id["r007"])

    # the cache serves a synchronous rerun into a new folder: no request of either kind
    n_bodies, n_lines = len(server.bodies), sum(server.batch_lines.values())
    sync = rate(
        RateArgs(
            input=str(pool),
            out=str(tmp_path / "sync"),
            judge_model="stub-judge",
            base_url=server.base_url,
            api_key=KEY,
            cache_dir=str(tmp_path / "cache"),
            progress=False,
        )
    )
    scored = {r["id"] for r in ds2}
    assert {r["id"] for r in sync} >= scored
    asked_sync = {t for b in server.bodies[n_bodies:] for t in SPECIAL.values() if t in last_user_text(b)}
    assert asked_sync == {SPECIAL[i] for i in (3, 9, 12, 15)}  # only the rows still failed are asked
    assert sum(server.batch_lines.values()) == n_lines

    for path, content in all_bytes(out, tmp_path / "cache"):
        assert KEY.encode() not in content, path
    assert server.authorization == {f"Bearer {KEY}"}


def test_sigkill_while_polling_then_rerun_reattaches(openai_server, tmp_path):
    server = openai_server(judge_responder, batch_polls=40)
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    rows = write_pool(pool, 12)
    opts = ("--mode", "batch", "--batch_poll_interval", "0.05")
    proc = cli(out, pool, server, None, *opts, popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(b["_polls"] >= 3 for b in list(server.batches.values())):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert server.n_batch_creates == 1 and next(iter(server.batches.values()))["status"] == "in_progress"
    assert not (out / "manifest.json").exists()

    resumed = cli(out, pool, server, None, *opts)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert server.n_batch_creates == 1 and server.n_uploads == 1  # re-attached, never paid twice
    assert set(server.batch_lines.values()) == {1} and len(server.batch_lines) == len(rows)
    data = read_stage_data(out)
    assert sorted(r["id"] for r in data) == [r["id"] for r in rows]
    output_id = next(iter(server.batches.values()))["output_file_id"]
    assert server.downloads[output_id] == 1

    again = cli(out, pool, server, None, *opts)  # done: skipped, the output is not read again
    assert again.returncode == 0 and server.downloads[output_id] == 1 and server.n_batch_creates == 1

    for path, content in all_bytes(out, out.parent / "cache"):
        assert KEY.encode() not in content, path
    assert KEY not in resumed.stdout + resumed.stderr
    assert server.authorization == {f"Bearer {KEY}"}


def test_create_reattaches_to_a_batch_whose_id_was_never_saved(openai_server, tmp_path):
    """A kill between ``batches.create`` and the checkpoint: the rerun finds the batch by its input file."""
    from openai import OpenAI

    server = openai_server(judge_responder, batch_polls=1)
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    write_pool(pool, 4)
    rate(batch_args(pool, out, server, tmp_path, batch_file_only=True))
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.jsonl").write_bytes((out / "batch_input.jsonl").read_bytes())
    client = OpenAI(base_url=server.base_url, api_key=KEY)
    file_id = client.files.create(file=open(work / "in.jsonl", "rb"), purpose="batch").id  # noqa: SIM115
    client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    state = BatchState(work)
    state.chunks = [Chunk("in.jsonl", 4, uploaded_at=time.time(), file_id=file_id)]
    state.save()
    got = {}
    server.batch_retrieve_errors = 3  # an outage while polling: logged, then polled again
    runner = BatchRunner(
        state, model="stub-judge", judge="j", base_url=server.base_url, api_key=KEY, poll_interval=0.01, max_retries=0
    )
    runner.run(lambda cid, r: got.setdefault(cid, r))
    assert server.n_batch_creates == 1 and len(got) == 4 and all(r.ok for r in got.values())
    assert server.batch_retrieve_errors == 0
    assert json.loads((work / "batches.json").read_text())["chunks"][0]["batch_id"] == "batch_1"


def test_a_lost_create_reply_never_makes_a_second_batch(openai_server, tmp_path):
    server = openai_server(judge_responder, batch_polls=1, batch_create_lost=1)
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    write_pool(pool, 5)
    ds = rate(batch_args(pool, out, server, tmp_path))
    assert server.batch_create_lost == 0  # the first create was answered with a 500 ...
    assert server.n_batch_creates == 1 and len(ds) == 5  # ... and found again, not created twice


def test_cancelled_batch_rows_fail_and_are_retried(openai_server, tmp_path):
    server = openai_server(judge_responder, batch_polls=10_000)
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    write_pool(pool, 10)

    def cancel_when_running() -> None:
        while not server.batches:
            time.sleep(0.01)
        with server._lock:
            next(iter(server.batches.values()))["status"] = "cancelling"

    t = threading.Thread(target=cancel_when_running)
    t.start()
    ds = rate(batch_args(pool, out, server, tmp_path))
    t.join()
    failed = failed_of(out)
    assert len(ds) == 5 and len(failed) == 5  # the server answered half before the cancel
    assert all("cancelled" in e for e in failed.values())
    server.batch_polls = 1
    ds2 = rate(batch_args(pool, out, server, tmp_path))
    assert len(ds2) == 10 and server.n_batch_creates == 2
    assert sorted(c for c, n in server.batch_lines.items() if n) == sorted(r["id"] for r in ds2)


def test_batch_file_only_then_results_from_elsewhere(openai_server, tmp_path):
    from openai import OpenAI

    server = openai_server(judge_responder)
    pool, out = tmp_path / "pool.jsonl", tmp_path / "rated"
    rows = write_pool(pool, 8, {2: "UNPARSEABLE answer"})
    by_id = {r["id"]: r for r in rows}
    assert rate(batch_args(pool, out, server, tmp_path, batch_file_only=True)) is None
    lines = [json.loads(x) for x in (out / "batch_input.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [r["id"] for r in rows]
    assert all(x["method"] == "POST" and x["url"] == "/v1/chat/completions" for x in lines)
    assert lines[0]["body"]["model"] == "stub-judge" and lines[0]["body"]["response_format"] == {"type": "json_object"}
    assert "cache_tag" not in lines[0]["body"]
    assert not (out / "manifest.json").exists() and server.n_requests == 0 and not server.files

    # a self-hosted judge runs the file (here: the stub's chat endpoint) and writes vllm run-batch lines
    client = OpenAI(base_url=server.base_url, api_key="x")
    results = []
    for k, line in enumerate(lines):
        if line["custom_id"] == "r005":
            continue  # a row the other side never answered
        if line["custom_id"] == "r006":
            results.append({"id": f"b{k}", "custom_id": "r006", "response": None, "error": "engine died"})
            continue
        reply = client.chat.completions.create(**line["body"]).model_dump()
        response = {"status_code": 200, "request_id": f"q{k}", "body": reply}
        results.append({"id": f"b{k}", "custom_id": line["custom_id"], "response": response, "error": None})
    results_file = tmp_path / "results.jsonl"
    results_file.write_text("".join(json.dumps(r) + "\n" for r in results) + "{not json\n")

    ds = rate(batch_args(pool, out, server, tmp_path, batch_results=str(results_file)))
    failed = failed_of(out)
    assert set(failed) == {"r002", "r005", "r006"}
    assert failed["r002"].startswith("unparseable reply") and "no reply for this row" in failed["r005"]
    assert failed["r006"] == "batch request failed: engine died"
    assert {r["id"]: r["rating"]["raw"] for r in ds} == {i: expected_raw(by_id[i]) for i in by_id if i not in failed}
    assert not server.files  # nothing went through the Batch API

    # the replies entered the cache: a synchronous run elsewhere asks only about the failed rows
    n_bodies = len(server.bodies)
    rate(
        RateArgs(
            input=str(pool),
            out=str(tmp_path / "sync"),
            judge_model="stub-judge",
            base_url=server.base_url,
            api_key=KEY,
            cache_dir=str(tmp_path / "cache"),
            progress=False,
        )
    )
    asked = {r["id"] for b in server.bodies[n_bodies:] for r in rows if r["completion"] in last_user_text(b)}
    assert asked == {"r002", "r005", "r006"}


def test_write_inputs_splits_at_requests_and_bytes(tmp_path):
    lines = [{"custom_id": f"r{i}", "body": {"x": "y" * 50}} for i in range(10)]
    size = len(json.dumps(lines[0]).encode()) + 1
    by_count = write_inputs(lines, tmp_path, "a", max_requests=4)
    assert [n for _, n in by_count] == [4, 4, 2]
    by_bytes = write_inputs(lines, tmp_path, "b", max_bytes=3 * size)
    assert [n for _, n in by_bytes] == [3, 3, 3, 1]
    assert all(p.stat().st_size <= 3 * size for p, _ in by_bytes)
    assert [x["custom_id"] for p, _ in by_bytes for x in map(json.loads, p.read_text().splitlines())] == [
        x["custom_id"] for x in lines
    ]
    with pytest.raises(ValueError, match="larger than"):
        write_inputs(lines, tmp_path, "c", max_bytes=size - 1)


def test_read_results_keeps_first_reply_per_row(tmp_path):
    reply = {"choices": [{"message": {"content": '{"overall": 7}'}}], "usage": {"prompt_tokens": 3}}
    line = {"custom_id": "a", "response": {"status_code": 200, "body": reply}, "error": None}
    other = {**line, "response": {"status_code": 200, "body": {**reply, "choices": []}}}
    f = tmp_path / "out.jsonl"
    f.write_text(json.dumps(line) + "\n" + json.dumps(other) + "\n[1]\n")
    results = read_results([f])
    assert (
        list(results) == ["a"] and results["a"].text == '{"overall": 7}' and results["a"].usage["prompt_tokens"] == 3
    )


def test_pipeline_config_passes_the_mode_through(tmp_path):
    from lmmixup_hf.pipeline.run import STAGES, load_config, stage_args

    pool = tmp_path / "pool.jsonl"
    write_pool(pool, 2)
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {pool}\nrate:\n  mode: batch\n  batch_poll_interval: 5.0\n")
    cfg = load_config(config)
    by_name = {s.name: s for s in STAGES}
    for name in ("rate", "rerate"):  # rerate uses the rate judge settings unless told otherwise
        args = stage_args(by_name[name], cfg, config)
        assert args.mode == "batch" and args.batch_poll_interval == 5.0


def test_estimate_before_the_bill(openai_server, tmp_path, capsys):
    from lmmixup_hf.judge.judges import build_judge_messages
    from lmmixup_hf.pipeline.rate import REPLY_TOKENS
    from lmmixup_hf.pipeline.report import _stage_rows, find_costs, summarize
    from lmmixup_hf.stages.rate import render_item

    server = openai_server(judge_responder, batch_polls=1)
    pool, out = tmp_path / "pool.jsonl", tmp_path / "run" / "rate"
    rows = write_pool(pool, 20)
    chars = sum(
        len(m["content"])
        for r in rows
        for m in build_judge_messages(JudgeItem(render_item(r, ("prompt", "completion")), "general"))
    )
    assert rate(batch_args(pool, out, server, tmp_path, estimate=True)) is None
    line = capsys.readouterr().out
    prompt, output = chars // 4, 20 * REPLY_TOKENS
    sync = (prompt * PRICE[0] + output * PRICE[1]) / 1e6
    assert f"20 rows to rate, ~{prompt:,} prompt + ~{output:,} output tokens" in line
    assert f"${sync:,.4f} synchronous, ${sync / 2:,.4f} batch" in line
    assert server.n_requests == 0 and not server.batches and not (out / "manifest.json").exists()

    rate(batch_args(pool, out, server, tmp_path))  # the estimate is also logged and kept in the manifest
    usage = json.loads((out / "manifest.json").read_text())["usage"]
    assert usage["estimate"] == {
        "rows": 20,
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "sync_usd": round(sync, 4),
        "batch_usd": round(sync / 2, 4),
    }
    assert abs(usage["prompt_tokens"] - prompt) <= 20  # the stub counts tokens as characters / 4 too
    assert usage["mode"] == "batch"
    # the report shows the actual cost with its mode, and never adds the estimate to it
    assert "usage.estimate.prompt_tokens" not in find_costs({"usage": usage})
    stage = next(s for s in summarize(out.parent) if s.name == "rate")
    assert _stage_rows([stage])[0][6] == f"${usage['cost_usd']:.4f} (batch)"
    assert stage.tokens == usage["prompt_tokens"] + usage["completion_tokens"]
