"""Model prices and the usage meter: requests, tokens and cost, counted as replies arrive."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lmmixup_hf.models.llm_client import ChatResult

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


@runtime_checkable
class Usage(Protocol):
    """What a judge, an engine or an embedder reports about its work: counters for the manifest."""

    def as_dict(self) -> dict[str, Any]:
        """The counters (requests, tokens, cost, ...) as plain JSON values."""
        ...


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
