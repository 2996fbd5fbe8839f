"""The LLM response cache: a request's hash -> its successful reply, on disk."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# parameters that may carry credentials; they never enter a cache key (``max_tokens`` is not one of them)
_SECRET = re.compile(
    r"(api[_-]?key|secret|password|authorization|access[_-]?token|auth[_-]?token|^extra_headers$)", re.I
)  # parameters that shape the cache key but are not sent to the server


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
