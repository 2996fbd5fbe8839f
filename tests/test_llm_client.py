"""ChatClient against a real loopback HTTP server: faults, retries, Retry-After, cache, limits, cost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from openai_server import Faults, last_user_text, messages_key, server_factory, token_logprobs

from lmmixup_hf.models.llm_client import ChatClient, price_for, run_sync

_openai_server = pytest.fixture(server_factory, name="openai_server")

KEY = "sk-test-NEVER-LOG-ME-4242"


def _batch(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"question number {i}"}] for i in range(n)]


def _echo(body: dict) -> str:
    return "answer to " + last_user_text(body)


def test_faults_every_request_ends_ok_or_failed(openai_server):
    faults = Faults(rate_429=0.10, rate_500=0.05, rate_malformed=0.05, rate_slow=0.05, slow_s=0.6, seed=3)
    server = openai_server(_echo, latency=0.01, faults=faults)
    client = ChatClient(
        "stub-model",
        base_url=server.base_url,
        api_key=KEY,
        max_concurrency=8,
        timeout=0.4,
        base_delay=0.005,
        max_retries=8,
    )
    batch = _batch(120)
    seen: dict[int, bool] = {}
    results = client.complete_many(
        batch, on_result=lambda i, r: seen.__setitem__(i, r.ok), show_progress=False, temperature=0
    )

    assert len(results) == len(batch) and sorted(seen) == list(range(len(batch)))
    for msgs, r in zip(batch, results, strict=True):
        assert (r.ok and r.text == "answer to " + msgs[0]["content"]) or (r.text is None and r.error)
    assert all(r.ok for r in results)  # 8 retries beat these fault rates
    # every fault kind happened, and was retried rather than returned
    assert {"429", "500", "malformed", "slow"} <= set(server.faults_sent)
    assert client.usage.n_retries >= sum(server.faults_sent.values()) - 1
    # a prompt is answered successfully once, unless an earlier answer came too slowly and was abandoned
    assert len(server.ok_by_key) == len(batch)
    assert all(n == 1 or server.slow_by_key[k] >= n - 1 for k, n in server.ok_by_key.items())
    assert client.usage.n_requests == len(batch) and client.usage.n_failed == 0
    assert server.authorization == {f"Bearer {KEY}"}


def test_retry_after_is_honoured(openai_server):
    server = openai_server(_echo, faults=Faults(first_attempts=("429",), retry_after="0.4"))
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, base_delay=0.001)
    t0 = time.perf_counter()
    results = client.complete_many(_batch(3), show_progress=False)
    assert all(r.ok for r in results)
    assert time.perf_counter() - t0 >= 0.4
    assert sorted(server.calls_by_key.values()) == [2, 2, 2]


def test_final_failure_is_an_error_never_a_text(openai_server):
    server = openai_server(_echo, faults=Faults(rate_500=1.0))
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, max_retries=2, base_delay=0.001)
    results = client.complete_many(_batch(4), show_progress=False)
    assert all(r.text is None and "500" in r.error and not r.ok for r in results)
    assert all(KEY not in r.error for r in results)
    assert sorted(server.calls_by_key.values()) == [3, 3, 3, 3]  # 1 try + 2 retries
    assert client.usage.n_failed == 4


def test_client_error_is_not_retried(openai_server):
    server = openai_server(lambda body: {"status": 404, "message": "no such model"})
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, base_delay=0.001)
    (r,) = client.complete_many(_batch(1), show_progress=False)
    assert not r.ok and "404" in r.error
    assert server.n_requests == 1


def test_cache_hit_makes_no_request_and_stores_no_key(openai_server, tmp_path: Path):
    server = openai_server(_echo)
    kw = dict(base_url=server.base_url, api_key=KEY, cache_dir=tmp_path / "cache")
    first = ChatClient("stub-model", **kw).complete_many(_batch(10), show_progress=False, temperature=0)
    assert server.n_requests == 10
    again = ChatClient("stub-model", **kw)
    second = again.complete_many(_batch(10), show_progress=False, temperature=0)
    assert server.n_requests == 10  # all from the cache
    assert [r.text for r in first] == [r.text for r in second] and all(r.cached for r in second)
    assert again.usage.n_cached == 10 and again.usage.n_requests == 0
    # other params or another model are other requests
    ChatClient("stub-model", **kw).complete_many(_batch(2), show_progress=False, temperature=0.5)
    ChatClient("other-model", **kw).complete_many(_batch(2), show_progress=False, temperature=0)
    assert server.n_requests == 14
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and all(KEY.encode() not in p.read_bytes() for p in files)


def test_in_flight_is_bounded(openai_server):
    server = openai_server(_echo, latency=0.05)
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, max_concurrency=4)
    t0 = time.perf_counter()
    assert all(r.ok for r in client.complete_many(_batch(24), show_progress=False))
    assert server.max_in_flight <= 4
    assert time.perf_counter() - t0 >= 24 / 4 * 0.05 * 0.9


def test_requests_per_minute_limit(openai_server):
    server = openai_server(_echo)
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, requests_per_minute=1200)  # 20/s
    t0 = time.perf_counter()
    client.complete_many(_batch(40), show_progress=False)
    # a 1 s burst of 20, then 20 more at 20/s
    assert time.perf_counter() - t0 >= 0.9
    assert server.n_requests == 40


def test_tokens_per_minute_limit(openai_server):
    server = openai_server(_echo)
    # each request is estimated at ~5 + 100 tokens; 6000 tokens/min = 100/s
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, tokens_per_minute=6000)
    t0 = time.perf_counter()
    client.complete_many(_batch(4), show_progress=False, max_tokens=100)
    assert time.perf_counter() - t0 >= 2.0


def test_unsupported_response_format_is_dropped(openai_server):
    server = openai_server(lambda body: '{"a": 1}', reject_params=("response_format",))
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, base_delay=0.001)
    results = client.complete_many(_batch(3), show_progress=False, response_format={"type": "json_object"})
    assert all(r.ok and r.text == '{"a": 1}' for r in results)
    assert "response_format" in client.unsupported
    assert "response_format" not in server.bodies[-1]


def test_logprobs_are_returned(openai_server):
    def responder(body: dict) -> dict:
        return {"content": "7", "logprobs": token_logprobs(["7"], {0: {"7": 0.5, "8": 0.5}})}

    server = openai_server(responder)
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY)
    (r,) = client.complete_many(_batch(1), show_progress=False, logprobs=True, top_logprobs=2)
    assert r.logprobs[0]["token"] == "7"
    assert {t["token"] for t in r.logprobs[0]["top_logprobs"]} == {"7", "8"}
    assert server.bodies[0]["top_logprobs"] == 2


def test_prices_and_cost(openai_server):
    assert price_for("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert price_for("openai/gpt-4o") == (2.50, 10.00)
    assert price_for("my-local-model") is None
    assert price_for("my-local-model", {"my-local-model": {"input": 1.0, "output": 2.0}}) == (1.0, 2.0)

    server = openai_server(lambda body: {"content": "x", "usage": {"prompt_tokens": 1000, "completion_tokens": 500}})
    client = ChatClient("gpt-4o-mini", base_url=server.base_url, api_key=KEY)
    client.complete_many(_batch(2), show_progress=False)
    u = client.usage.as_dict()
    assert u["prompt_tokens"] == 2000 and u["completion_tokens"] == 1000
    assert u["cost_usd"] == pytest.approx((2000 * 0.15 + 1000 * 0.60) / 1e6)
    unknown = ChatClient("my-local-model", base_url=server.base_url, api_key=KEY)
    unknown.complete_many(_batch(1), show_progress=False)
    assert unknown.usage.cost_usd == 0 and "no price" in unknown.usage.as_dict()["note"]


def test_env_defaults_and_repr_hide_the_key(monkeypatch, openai_server):
    server = openai_server(_echo)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = ChatClient("stub-model")
    assert client.complete_many(_batch(1), show_progress=False)[0].ok
    assert server.authorization == {f"Bearer {KEY}"}
    assert KEY not in repr(client) and KEY not in str(vars(client.usage))


def test_run_sync_inside_a_running_loop(openai_server):
    server = openai_server(_echo)
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY)

    async def notebook_cell() -> list:
        return client.complete_many(_batch(2), show_progress=False)

    assert all(r.ok for r in asyncio.run(notebook_cell()))
    assert run_sync(asyncio.sleep(0, result=5)) == 5


def test_acomplete_directly(openai_server):
    server = openai_server(_echo)
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY)

    async def go():
        try:
            return await asyncio.gather(*(client.acomplete(m) for m in _batch(3)))
        finally:
            await client.aclose()

    results = asyncio.run(go())
    assert [r.text for r in results] == [f"answer to question number {i}" for i in range(3)]
    assert len({messages_key(b["messages"]) for b in server.bodies}) == 3


def test_extra_body_and_headers_are_sent_like_the_sdk(openai_server):
    server = openai_server(_echo)
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY)
    (r,) = client.complete_many(
        _batch(1),
        show_progress=False,
        max_tokens=7,
        extra_body={"repetition_penalty": 1.1},
        extra_headers={"X-Trace": "abc"},
    )
    assert r.ok
    body = server.bodies[0]
    assert body["repetition_penalty"] == 1.1 and body["max_tokens"] == 7 and "extra_body" not in body
    assert "extra_headers" not in body and body["model"] == "stub-model"


def test_error_names_headers_and_timeouts(openai_server, monkeypatch, tmp_path):
    """Errors read as the openai client names them; organisation/project headers are sent; a timeout
    is retried and then reported, never a text; the cache does not fsync per reply."""
    codes = {"a": 401, "b": 429, "c": 503}

    def responder(body: dict) -> dict:
        text = last_user_text(body)
        return {"status": codes[text], "message": f"scripted {text}"} if text in codes else {"content": "ok"}

    server = openai_server(responder)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-test")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-test")
    client = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, max_retries=1, base_delay=0.001)
    batch = [[{"role": "user", "content": t}] for t in ("a", "b", "c", "d")]
    a, b, c, d = client.complete_many(batch, show_progress=False)
    assert a.error == "AuthenticationError: Error code: 401 - scripted a"
    assert b.error == "RateLimitError: Error code: 429 - scripted b"
    assert c.error == "InternalServerError: Error code: 503 - scripted c"
    assert d.ok and d.text == "ok"
    assert server.calls_by_key[messages_key(batch[0][:1])] == 1  # 401: not retried
    assert server.calls_by_key[messages_key(batch[1][:1])] == 2  # 429, 5xx: retried
    headers = {k.lower(): v for k, v in server.last_headers.items()}
    assert headers["openai-organization"] == "org-test" and headers["openai-project"] == "proj-test"
    assert headers["authorization"] == f"Bearer {KEY}" and headers["content-type"] == "application/json"

    # the server sleeps far longer than the timeout, which leaves room for a loaded machine to connect
    slow = openai_server(_echo, latency=5.0)
    client = ChatClient(
        "stub-model", base_url=slow.base_url, api_key=KEY, timeout=0.5, max_retries=1, base_delay=0.001
    )
    (r,) = client.complete_many(_batch(1), show_progress=False)
    assert r.text is None and r.error == "TimeoutError: no reply within 0.5 s"
    deadline = time.monotonic() + 5  # the retry's request may reach the server after the client gave up
    while slow.n_requests < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow.n_requests == 2  # the first try and one retry

    cached = ChatClient("stub-model", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path)
    assert cached.cache.store._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_cache_buffers_writes_and_reads_its_buffer(tmp_path):
    from lmmixup_hf.models.llm_client import ResponseCache

    cache = ResponseCache(tmp_path / "c.sqlite", flush_every=3, flush_seconds=3600)
    cache.put("a", {"text": "A"})
    cache.put("b", {"text": "B"})
    assert cache.get("a") == {"text": "A"}  # still buffered, already visible
    assert ResponseCache(tmp_path / "c.sqlite").get("a") is None  # not yet on disk
    cache.delete("b")
    cache.put("c", {"text": "C"})  # the third write commits the buffer
    other = ResponseCache(tmp_path / "c.sqlite")
    assert other.get("a") == {"text": "A"} and other.get("b") is None and other.get("c") == {"text": "C"}
    cache.delete("a")
    assert cache.get("a") is None
    cache.flush()
    assert ResponseCache(tmp_path / "c.sqlite").get("a") is None
