"""Errors of an OpenAI-compatible endpoint: status failures named as the ``openai`` package names
them, which of them are retried, and how long the server asked us to wait."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}


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


class _BadResponse(Exception):
    """The server answered 200 but with nothing usable in it."""
