"""The rate command's judge, built from its options wherever it runs (here, or on a Ray actor)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.judge.judges import make_judge
from lmmixup_hf.judge.protocol import Judge


def _load_prices(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmmixupError(f"--prices {path}: {e}") from None


def _cache_dir(value: str | None) -> Path | None:
    if value and value.lower() == "none":
        return None
    if value:
        return Path(value)
    from lmmixup_hf.models.registry import cache_root

    return cache_root() / "llm"


def judge_factory(args: Any, make: Callable[..., Judge] = make_judge) -> Callable[[], Judge]:
    """What builds the judge, wherever it runs: the endpoint and key are resolved here, so judges
    built elsewhere (Ray actors on other nodes) use the driver's. ``args``: the rate command's
    options; ``make``: the judge constructor (tests swap it)."""
    return partial(
        make,
        args.engine,
        args.judge_model,
        base_url=args.base_url or os.environ.get("OPENAI_BASE_URL"),
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        max_concurrency=args.max_concurrency,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_retries=args.max_retries,
        timeout=args.timeout,
        retry_base_delay=args.retry_base_delay,
        cache_dir=_cache_dir(args.cache_dir),
        prices=_load_prices(args.prices),
        json_mode=args.json_mode,
        logprobs=args.logprobs,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
