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
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmmixup_hf.models.aio import TokenBucket, map_bounded, run_sync, usage_bar
from lmmixup_hf.models.cache import ResponseCache, request_key
from lmmixup_hf.models.errors import APIStatusFailure, _BadResponse, _error_text, _is_retryable, _retry_after
from lmmixup_hf.models.pricing import BATCH_DISCOUNT, DEFAULT_PRICES, Usage, UsageMeter, batch_price_for, price_for

__all__ = [
    "BATCH_DISCOUNT",
    "DEFAULT_PRICES",
    "APIStatusFailure",
    "ChatClient",
    "ChatResult",
    "ResponseCache",
    "TokenBucket",
    "Usage",
    "UsageMeter",
    "batch_price_for",
    "map_bounded",
    "price_for",
    "request_key",
    "run_sync",
    "usage_bar",
]

logger = logging.getLogger(__name__)

_NOT_SENT = ("cache_tag",)


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

    def flush(self) -> None:
        """Commit the response cache's buffered writes (e.g. before a worker may be stopped)."""
        if self.cache is not None:
            self.cache.flush()

    async def aclose(self) -> None:
        self.flush()
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
