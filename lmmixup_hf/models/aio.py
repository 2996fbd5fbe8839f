"""Async helpers: a token bucket, a bounded map, a live usage bar, and running a coroutine from
sync code (also inside a notebook's event loop)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from lmmixup_hf.models.pricing import UsageMeter

T = TypeVar("T")


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
