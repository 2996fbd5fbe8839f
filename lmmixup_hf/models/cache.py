"""The LLM response cache: a request's hash -> its successful reply, on disk."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmmixup_hf.models.kvstore import KVStore

# parameters that may carry credentials; they never enter a cache key (``max_tokens`` is not one of them)
_SECRET = re.compile(
    r"(api[_-]?key|secret|password|authorization|access[_-]?token|auth[_-]?token|^extra_headers$)", re.I
)


class ResponseCache:
    """Map from a request hash to its successful result (JSON), in a :class:`~lmmixup_hf.models.kvstore.KVStore`.
    Only the hash of the request is stored, so neither the prompt's secrets nor any credential ever
    lands on disk. Writes follow the store's rule: buffered, committed together, visible at once."""

    def __init__(self, path: str | Path, flush_every: int = 256, flush_seconds: float = 2.0):
        self.store = KVStore(path, "responses", flush_every=flush_every, flush_seconds=flush_seconds)
        self.path = self.store.path

    def get(self, key: str) -> dict | None:
        """The cached result of a request key, or None."""
        value = self.store.get(key)
        return json.loads(value) if value is not None else None

    def put(self, key: str, value: dict) -> None:
        """Cache a result (buffered)."""
        self.store.put(key, json.dumps(value, ensure_ascii=False))

    def delete(self, key: str) -> None:
        """Forget a result, so the request is sent again."""
        self.store.delete(key)

    def flush(self) -> None:
        """Commit the buffered writes."""
        self.store.flush()


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
