"""One small SQLite key-value store behind both caches (LLM replies, embeddings), with one rule for
locking and writing:

- one connection per thread (SQLite connections are not shared), WAL journal, ``synchronous=NORMAL``:
  a crashed process loses nothing committed, a power cut at worst the last writes, which are
  recomputed; with an fsync per commit each write blocked for milliseconds;
- writes are buffered and committed together, every ``flush_every`` entries or ``flush_seconds``
  and on :meth:`KVStore.flush`: a transaction per entry cost more CPU than the work it saved;
- reads see the buffer, so a value is visible the moment it is put; a kill loses at most the
  buffered entries, which are then computed again (the stages' own checkpoints are separate).

Values are ``str`` or ``bytes``; the callers encode (JSON, float32 bytes).

>>> import tempfile, pathlib
>>> store = KVStore(pathlib.Path(tempfile.mkdtemp()) / "kv.sqlite", "demo", flush_every=2)
>>> store.put("a", "1"); store.get("a")
'1'
>>> store.put_many([("b", b"\\x00"), ("c", "3")]); sorted(store.get_many(["a", "b", "x"]))
['a', 'b']
>>> store.delete("a"); store.flush(); store.get("a") is None, len(store)
(True, 2)
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_SQL_CHUNK = 900  # stay under SQLite's bound-parameter limit
_DELETED = object()  # a buffered deletion


class KVStore:
    """A SQLite table ``key TEXT -> value`` with buffered writes (see the module docstring)."""

    def __init__(self, path: str | Path, table: str = "kv", *, flush_every: int = 256, flush_seconds: float = 2.0):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
            raise ValueError(f"table name {table!r}: letters, digits and underscores only")
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table = table
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}  # key -> value, or _DELETED
        self._flushed_at = time.monotonic()
        with self._conn() as c:
            c.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value NOT NULL)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The stored values of ``keys`` (missing keys are left out)."""
        found: dict[str, Any] = {}
        ask: list[str] = []
        with self._lock:
            for key in keys:
                if key in self._pending:
                    if self._pending[key] is not _DELETED:
                        found[key] = self._pending[key]
                else:
                    ask.append(key)
        conn = self._conn()
        for i in range(0, len(ask), _SQL_CHUNK):
            chunk = ask[i : i + _SQL_CHUNK]
            query = f"SELECT key, value FROM {self.table} WHERE key IN ({','.join('?' * len(chunk))})"
            found.update(conn.execute(query, chunk).fetchall())
        return found

    def get(self, key: str) -> Any | None:
        """The value of ``key``, or None."""
        return self.get_many([key]).get(key)

    def put_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Buffer ``(key, value)`` writes; commits when the buffer is due."""
        with self._lock:
            self._pending.update(items)
            due = len(self._pending) >= self.flush_every or time.monotonic() - self._flushed_at >= self.flush_seconds
        if due:
            self.flush()

    def put(self, key: str, value: Any) -> None:
        """Buffer one write."""
        self.put_many([(key, value)])

    def delete(self, key: str) -> None:
        """Buffer a deletion: the key reads as missing from now on."""
        self.put_many([(key, _DELETED)])

    def flush(self) -> None:
        """Commit the buffered writes in one transaction."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flushed_at = time.monotonic()
        if not pending:
            return
        with self._conn() as c:
            c.executemany(
                f"DELETE FROM {self.table} WHERE key = ?", [(k,) for k, v in pending.items() if v is _DELETED]
            )
            c.executemany(
                f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)",
                [(k, v) for k, v in pending.items() if v is not _DELETED],
            )

    def __len__(self) -> int:
        self.flush()
        return self._conn().execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]
