"""One chat client for every OpenAI-compatible endpoint: bounded concurrency, client-side rate
limits, retries with backoff, a disk cache and live usage/cost accounting.

It works with OpenAI, ``vllm serve``, the llama.cpp server or anything else that speaks
``/v1/chat/completions``. Requests go out as plain JSON over one ``aiohttp`` session: the ``openai``
client's request building, response models and connection pool cost several times more CPU per
request than the rest of the work together, which capped throughput at high concurrency. Errors keep
the ``openai`` package's names (``RateLimitError``, ``InternalServerError``, ...). Our retries honour
``Retry-After`` and never give up silently. A request that finally fails comes back as a
:class:`ChatResult` with ``error`` set, never with a made-up text.

>>> client = ChatClient("gpt-4o-mini", max_concurrency=32, cache_dir="~/.cache/lmmixup-hf/llm")
>>> results = client.complete_many([[{"role": "user", "content": "Hi"}]], temperature=0)
>>> client.usage.as_dict()
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

# USD per 1M tokens (input, output), from the providers' public price lists. Matched by the longest
# prefix of the model name (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``); extend or override
# with ``ChatClient(prices={...})``.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "o4-mini": (1.10, 4.40),
    "o3-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}

_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
_NOT_SENT = ("cache_tag",)
# parameters that may carry credentials; they never enter a cache key (``max_tokens`` is not one of them)
_SECRET = re.compile(
    r"(api[_-]?key|secret|password|authorization|access[_-]?token|auth[_-]?token|^extra_headers$)", re.I
)  # parameters that shape the cache key but are not sent to the server


@dataclass
class ChatResult:
    text: str | None  # None when the request finally failed
    error: str | None  # why it failed (never contains the API key)
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    logprobs: list | None = None  # content-token logprobs (with top_logprobs) when requested and returned
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


def price_for(model: str, prices: dict[str, Any] | None = None) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for ``model``, or None when unknown."""
    table: dict[str, Any] = {**DEFAULT_PRICES, **(prices or {})}
    name = model.rsplit("/", 1)[-1].lower()
    if name in table:
        found = table[name]
    else:
        keys = [k for k in table if name.startswith(k.lower())]
        if not keys:
            return None
        found = table[max(keys, key=len)]
    if isinstance(found, dict):
        return float(found.get("input", 0.0)), float(found.get("output", 0.0))
    return float(found[0]), float(found[1])


# Batch jobs (OpenAI's Batch API) are billed at half the synchronous price. A price-table entry may
# give its own batch prices as ``{"input": .., "output": .., "batch_input": .., "batch_output": ..}``.
BATCH_DISCOUNT = 0.5


def batch_price_for(model: str, prices: dict[str, Any] | None = None) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for ``model`` in a batch job, or None when unknown."""
    price = price_for(model, prices)
    if price is None:
        return None
    name = model.rsplit("/", 1)[-1].lower()
    entry = {**DEFAULT_PRICES, **(prices or {})}.get(name)
    if isinstance(entry, dict) and "batch_input" in entry:
        return float(entry["batch_input"]), float(entry.get("batch_output", 0.0))
    return price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT


class UsageMeter:
    """Thread-safe counters for requests, tokens and cost; ``as_dict()`` goes into manifests."""

    def __init__(self, model: str, prices: dict[str, Any] | None = None):
        self.model = model
        self.price = price_for(model, prices)
        self.note = None if self.price else f"no price known for model {model!r}; cost counted as 0"
        self._lock = threading.Lock()
        self.n_requests = self.n_cached = self.n_failed = self.n_retries = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = 0.0

    def add(self, result: ChatResult) -> None:
        with self._lock:
            if result.cached:
                self.n_cached += 1
                return
            self.n_requests += 1
            if not result.ok:
                self.n_failed += 1
            p, c = int(result.usage.get("prompt_tokens", 0)), int(result.usage.get("completion_tokens", 0))
            self.prompt_tokens += p
            self.completion_tokens += c
            if self.price:
                self.cost_usd += (p * self.price[0] + c * self.price[1]) / 1e6

    def retried(self) -> None:
        with self._lock:
            self.n_retries += 1

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        d = {
            "model": self.model,
            "n_requests": self.n_requests,
            "n_cached": self.n_cached,
            "n_failed_requests": self.n_failed,
            "n_retries": self.n_retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "price_per_1m_tokens": list(self.price) if self.price else None,
        }
        if self.note:
            d["note"] = self.note
        return d


class TokenBucket:
    """An asyncio token bucket: ``rate`` units per second, bursts up to ``capacity``."""

    def __init__(self, per_minute: float, burst_seconds: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock: asyncio.Lock | None = None

    async def acquire(self, n: float = 1.0) -> None:
        n = min(float(n), self.capacity)  # a request larger than the bucket waits for a full bucket
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


class ResponseCache:
    """SQLite map from a request hash to its successful result. Only the hash of the request is
    stored, so neither the prompt's secrets nor any credential ever lands on disk.

    Writes are buffered and committed together (every ``flush_every`` replies or ``flush_seconds``,
    and on :meth:`flush`): one transaction per reply cost more CPU than the request itself. A kill
    loses at most the buffered replies, which are then asked again; the rows' checkpoints are
    separate and unaffected."""

    def __init__(self, path: str | Path, flush_every: int = 256, flush_seconds: float = 2.0):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: dict[str, str | None] = {}  # key -> JSON value, or None for a deletion
        self._flushed_at = time.monotonic()
        with self._conn() as c:
            c.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            # no fsync per commit: in WAL mode a crash of the process loses nothing, and a power cut at
            # worst the last replies, which are asked again. With fsync, each write blocked the event
            # loop for ~6 ms, which capped a cached run at ~170 replies/s whatever the concurrency
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> dict | None:
        with self._lock:
            if key in self._pending:
                value = self._pending[key]
                return json.loads(value) if value is not None else None
        row = self._conn().execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def _buffer(self, key: str, value: str | None) -> None:
        with self._lock:
            self._pending[key] = value
            due = len(self._pending) >= self.flush_every or time.monotonic() - self._flushed_at >= self.flush_seconds
        if due:
            self.flush()

    def delete(self, key: str) -> None:
        self._buffer(key, None)

    def put(self, key: str, value: dict) -> None:
        self._buffer(key, json.dumps(value, ensure_ascii=False))

    def flush(self) -> None:
        """Commit the buffered writes in one transaction."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flushed_at = time.monotonic()
        if not pending:
            return
        with self._conn() as c:
            c.executemany("DELETE FROM responses WHERE key = ?", [(k,) for k, v in pending.items() if v is None])
            c.executemany(
                "INSERT OR REPLACE INTO responses VALUES (?, ?)", [(k, v) for k, v in pending.items() if v is not None]
            )


def request_key(model: str, messages: Sequence[dict], params: dict[str, Any]) -> str:
    """The cache key: (model, params, messages). Secret-looking params never enter it."""
    payload = json.dumps(
        {
            "model": model,
            "params": {k: v for k, v in params.items() if not _SECRET.search(k)},
            "messages": list(messages),
        },
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# the ``openai`` package's exception names per status, so error messages read the same as with its client
_STATUS_NAMES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


class APIStatusFailure(Exception):
    """A reply with an error status. ``name`` is what the ``openai`` package would call it."""

    def __init__(self, status_code: int, message: str, headers: Any = None):
        super().__init__(f"Error code: {status_code} - {message}")
        self.status_code, self.message, self.headers = status_code, message, headers or {}

    @property
    def name(self) -> str:
        default = "InternalServerError" if self.status_code >= 500 else "APIStatusError"
        return _STATUS_NAMES.get(self.status_code, default)

    @classmethod
    def from_body(cls, status_code: int, raw: bytes, headers: Any) -> APIStatusFailure:
        text = raw.decode("utf-8", "replace").strip()
        try:
            body = json.loads(text)
        except ValueError:
            return cls(status_code, text[:500], headers)
        error = body.get("error", body) if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return cls(status_code, message if isinstance(message, str) and message else text[:500], headers)


def _retry_after(exc: Exception) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After``: seconds or a date)."""
    headers = getattr(exc, "headers", None) or getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _is_retryable(exc: Exception) -> bool:
    import aiohttp

    if isinstance(exc, APIStatusFailure):
        return exc.status_code in _RETRYABLE_STATUS or exc.status_code >= 500
    if isinstance(exc, aiohttp.InvalidURL):
        return False
    # timeouts, refused or dropped connections, a 200 whose body is not valid JSON, an empty choice list ...
    retryable = (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError, json.JSONDecodeError, _BadResponse)
    return isinstance(exc, retryable)


def _error_text(exc: Exception, timeout: float) -> str:
    if isinstance(exc, APIStatusFailure):
        return f"{exc.name}: {exc}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"TimeoutError: no reply within {timeout:g} s"
    return f"{type(exc).__name__}: {exc}"


def _ssl_context() -> Any:
    """Like the ``openai`` client: certifi's CA bundle unless SSL_CERT_FILE/SSL_CERT_DIR say otherwise."""
    import ssl

    if not (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")):
        try:
            import certifi

            return ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            pass
    return ssl.create_default_context()


class _BadResponse(Exception):
    """The server answered 200 but with nothing usable in it."""


def _split_request(model: str, messages: list[dict], params: dict[str, Any]) -> tuple[dict, dict]:
    """The JSON body and the request options, as ``chat.completions.create`` would build them:
    ``extra_body`` is merged into the body; ``extra_headers``/``extra_query``/``timeout`` are options."""
    params = dict(params)
    options: dict[str, Any] = {}
    for name, option in (("extra_headers", "headers"), ("extra_query", "params"), ("timeout", "timeout")):
        if params.get(name) is not None:
            options[option] = params.pop(name)
        params.pop(name, None)
    extra = params.pop("extra_body", None) or {}
    return {"model": model, "messages": messages, **params, **extra}, options


def _plain_logprobs(choice: dict) -> list | None:
    """The content-token logprobs of a choice, without the per-token byte lists."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    return [
        {
            "token": t["token"],
            "logprob": float(t["logprob"]),
            "top_logprobs": [
                {"token": x["token"], "logprob": float(x["logprob"])} for x in t.get("top_logprobs") or ()
            ],
        }
        for t in content
    ]


def _parse_completion(raw: bytes) -> ChatResult:
    """A chat completion body as a result; raises (retryably) when it holds no usable message."""
    data = json.loads(raw)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise _BadResponse("the server returned no choices")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content")
    if not isinstance(text, str):
        raise _BadResponse("the server returned an empty message")
    u = data.get("usage") or {}
    usage = {
        "prompt_tokens": int(u.get("prompt_tokens") or 0),
        "completion_tokens": int(u.get("completion_tokens") or 0),
    }
    return ChatResult(text, None, usage, _plain_logprobs(choice), cached=False)


class ChatClient:
    """Async chat completions with the bookkeeping a data pipeline needs (see module docstring)."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 64,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int = 6,
        timeout: float = 60.0,
        cache_dir: str | Path | None = None,
        prices: dict | None = None,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
    ):
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers accept any key
        self.max_concurrency = max(1, int(max_concurrency))
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.max_retries = max_retries
        self.timeout = timeout
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.cache = ResponseCache(Path(cache_dir).expanduser() / "responses.sqlite") if cache_dir else None
        self.usage = UsageMeter(model, prices)
        self.unsupported: set[str] = set()  # params the server rejected (e.g. response_format); dropped
        self._session: Any = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._url = (self.base_url or "https://api.openai.com/v1").rstrip("/") + "/chat/completions"
        self._proxy: dict[str, Any] = {}
        self._limits: tuple[TokenBucket | None, TokenBucket | None] | None = None
        if self.usage.note:
            logger.info(self.usage.note)

    def __repr__(self) -> str:  # never show the key
        return f"ChatClient(model={self.model!r}, base_url={self.base_url!r}, max_concurrency={self.max_concurrency})"

    # -- plumbing ---------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        key = self._api_key
        return text.replace(key, "***") if key and len(key) > 3 else text

    def _headers(self) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "lmmixup-hf",
        }
        for env, name in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
            if os.environ.get(env):
                headers[name] = os.environ[env]
        return headers

    def _get_session(self) -> Any:
        """One session (connection pool) per event loop; sessions cannot move between loops."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop:
            import aiohttp

            # a pool as large as the openai client's (1000 connections), more than any sane in-flight limit
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=1000, ssl=_ssl_context() if self._url.startswith("https") else True
                ),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers=self._headers(),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            # HTTP(S)_PROXY / NO_PROXY, as the openai client honours them; looked up once here, not per
            # request in a thread as the session's trust_env would
            from aiohttp.helpers import get_env_proxy_for_url
            from yarl import URL

            try:
                proxy, proxy_auth = get_env_proxy_for_url(URL(self._url))
                self._proxy = {"proxy": proxy, "proxy_auth": proxy_auth}
            except LookupError:
                self._proxy = {}
            self._session_loop = loop
            self._limits = (
                TokenBucket(self.requests_per_minute) if self.requests_per_minute else None,
                TokenBucket(self.tokens_per_minute) if self.tokens_per_minute else None,
            )
        return self._session

    async def aclose(self) -> None:
        if self.cache is not None:
            self.cache.flush()
        if self._session is not None and self._session_loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = self._session_loop = None

    def _backoff(self, attempt: int, exc: Exception) -> float:
        delay = min(self.max_delay, self.base_delay * (2**attempt)) * (0.5 + random.random() / 2)
        asked = _retry_after(exc)
        return max(delay, min(asked, self.max_delay)) if asked is not None else delay

    @staticmethod
    def _estimate_tokens(messages: Sequence[dict], params: dict[str, Any]) -> int:
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        return chars // 4 + int(params.get("max_tokens") or params.get("max_completion_tokens") or 256)

    # -- requests ---------------------------------------------------------------------------------
    async def acomplete(self, messages: list[dict], **params: Any) -> ChatResult:
        """One chat completion with cache, rate limits and retries; never raises for server faults."""
        key = request_key(self.model, messages, params)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                result = ChatResult(hit["text"], None, hit.get("usage", {}), hit.get("logprobs"), cached=True)
                self.usage.add(result)
                return result
        result = await self._request(messages, params)
        if result.ok and self.cache is not None:
            self.cache.put(key, {"text": result.text, "usage": result.usage, "logprobs": result.logprobs})
        self.usage.add(result)
        return result

    def forget(self, messages: list[dict], **params: Any) -> None:
        """Drop a cached reply (e.g. one the caller could not use), so the next call asks again."""
        if self.cache is not None:
            self.cache.delete(request_key(self.model, messages, params))

    async def _post(self, session: Any, body: dict[str, Any], options: dict[str, Any]) -> ChatResult:
        import aiohttp

        kwargs: dict[str, Any] = {}
        if options.get("headers"):
            kwargs["headers"] = {k: str(v) for k, v in options["headers"].items() if v is not None}
        if options.get("params"):
            kwargs["params"] = options["params"]
        if options.get("timeout") is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=float(options["timeout"]))
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        async with session.post(self._url, data=data, **self._proxy, **kwargs) as response:
            raw = await response.read()
            if response.status >= 400:
                raise APIStatusFailure.from_body(response.status, raw, response.headers)
        return _parse_completion(raw)

    async def _request(self, messages: list[dict], params: dict[str, Any]) -> ChatResult:
        session = self._get_session()
        rpm, tpm = self._limits or (None, None)
        error = "not attempted"
        for attempt in range(self.max_retries + 1):
            send = {k: v for k, v in params.items() if k not in _NOT_SENT and k not in self.unsupported}
            if send.get("logprobs") is False or "logprobs" in self.unsupported:
                send.pop("top_logprobs", None)
            if rpm:
                await rpm.acquire(1)
            if tpm:
                await tpm.acquire(self._estimate_tokens(messages, send))
            try:
                body, options = _split_request(self.model, messages, send)
                return await self._post(session, body, options)
            except Exception as e:  # noqa: BLE001 - classified below; a non-retryable error ends this request
                error = self._scrub(_error_text(e, self.timeout))
                if isinstance(e, APIStatusFailure) and e.status_code == 400:
                    # an optional feature the server does not support: drop it once and ask again
                    rejected = next((p for p in ("response_format", "logprobs") if p in send and p in e.message), None)
                    if rejected is None:
                        return ChatResult(None, error)
                    logger.warning("%s: server rejected %r; retrying without it", self.model, rejected)
                    self.unsupported.add(rejected)
                    continue
                if not _is_retryable(e) or attempt == self.max_retries:
                    return ChatResult(None, error)
                self.usage.retried()
                await asyncio.sleep(self._backoff(attempt, e))
        return ChatResult(None, error)

    async def acomplete_many(
        self,
        batch: Sequence[list[dict]],
        *,
        on_result: Callable[[int, ChatResult], None] | None = None,
        progress: Callable[[ChatResult], None] | None = None,
        **params: Any,
    ) -> list[ChatResult]:
        """Run ``batch`` with at most ``max_concurrency`` requests in flight."""

        async def one(i: int) -> ChatResult:
            return await self.acomplete(batch[i], **params)

        try:
            return await map_bounded(one, len(batch), self.max_concurrency, on_result=on_result, progress=progress)
        finally:
            await self.aclose()

    def complete_many(
        self,
        batch: Sequence[list[dict]],
        *,
        desc: str = "requests",
        on_result: Callable[[int, ChatResult], None] | None = None,
        show_progress: bool = True,
        **params: Any,
    ) -> list[ChatResult]:
        """Synchronous wrapper over :meth:`acomplete_many` with a live tqdm bar (rows/s, tokens, $).
        ``on_result(i, result)`` runs as each request finishes, e.g. to checkpoint it."""
        with usage_bar(len(batch), desc, self.usage, disable=not show_progress) as progress:
            return run_sync(self.acomplete_many(batch, on_result=on_result, progress=progress, **params))


async def map_bounded(
    fn: Callable[[int], Awaitable[T]],
    n: int,
    concurrency: int,
    *,
    on_result: Callable[[int, T], None] | None = None,
    progress: Callable[[T], None] | None = None,
) -> list[T]:
    """``[await fn(i) for i in range(n)]`` with at most ``concurrency`` running at once. A fixed pool
    of workers pulls indices, so memory stays bounded however large ``n`` is."""
    results: list[Any] = [None] * n
    indices = iter(range(n))

    async def worker() -> None:
        for i in indices:
            res = await fn(i)
            results[i] = res
            if on_result is not None:
                on_result(i, res)
            if progress is not None:
                progress(res)

    await asyncio.gather(*(worker() for _ in range(min(max(1, concurrency), max(1, n)))))
    return results


@contextmanager
def usage_bar(total: int, desc: str, usage: UsageMeter, disable: bool = False) -> Iterator[Callable[[Any], None]]:
    """A tqdm bar whose postfix shows live tokens, cost, failures and cache hits."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="row", disable=disable, dynamic_ncols=True)

    def progress(_: Any = None) -> None:
        bar.update(1)
        bar.set_postfix(
            tokens=usage.tokens,
            cost=f"${usage.cost_usd:.4f}",
            failed=usage.n_failed,
            cached=usage.n_cached,
            refresh=False,
        )

    try:
        yield progress
    finally:
        bar.close()


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion, also from code that already runs inside an event loop
    (notebooks): then it runs on a private loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
