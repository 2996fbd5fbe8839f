"""The LLM judge: our rubric prompts, tolerant reply parsing and G-Eval style expected scores, over
any OpenAI-compatible endpoint (:class:`OpenAIJudge`) or a local transformers model
(:class:`LocalJudge`). Both return :class:`Rating` objects through the same ``rate_many``.

The rubric follows the method: Rarity, Complexity, Informativeness and Overall, each an integer
1-10, reference-free by default (only the item is shown). ``score = clip(overall, 4, 9) - 4``.
A reply that cannot be parsed is never turned into a score: the rating fails with its error.

Built by :func:`make_judge` here; the parts live in ``rubric``, ``parsing``, ``api`` and ``local``.

``style="reference"`` swaps in the reference rating script's prompt (one user message, no system
turn) and its reply parsing (first JSON array else object, values cut to int, ``Overall rating``
else ``Overall``); see ``docs/rating.md``.
"""

from __future__ import annotations

from pathlib import Path

from lmmixup_hf.judge.api import OpenAIJudge
from lmmixup_hf.judge.local import LocalJudge
from lmmixup_hf.judge.parsing import (
    Rating,
    ReplyParseError,
    expected_score,
    make_rating,
    parse_reply,
    parse_reply_for,
    parse_reply_reference,
)
from lmmixup_hf.judge.protocol import Judge
from lmmixup_hf.judge.rubric import (
    DIMENSIONS,
    JUDGE_SYSTEM,
    KINDS,
    LOCAL_REFERENCE_KEYS,
    REFERENCE_RUBRICS,
    RUBRIC_VERSION,
    RUBRICS,
    STYLES,
    JudgeItem,
    build_judge_messages,
    reference_kind,
    reference_rubric_prompt,
    rubric_kind,
)

__all__ = [
    "DIMENSIONS",
    "JUDGE_SYSTEM",
    "Judge",
    "KINDS",
    "LOCAL_REFERENCE_KEYS",
    "REFERENCE_RUBRICS",
    "RUBRICS",
    "RUBRIC_VERSION",
    "STYLES",
    "JudgeItem",
    "LocalJudge",
    "OpenAIJudge",
    "Rating",
    "ReplyParseError",
    "build_judge_messages",
    "expected_score",
    "make_judge",
    "make_rating",
    "parse_reply",
    "parse_reply_for",
    "parse_reply_reference",
    "reference_kind",
    "reference_rubric_prompt",
    "rubric_kind",
]


def make_judge(
    engine: str,
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    max_concurrency: int = 64,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    max_retries: int = 6,
    timeout: float = 60.0,
    retry_base_delay: float = 1.0,
    cache_dir: str | Path | None = None,
    prices: dict | None = None,
    json_mode: bool = True,
    logprobs: bool = True,
    temperature: float = 0.0,
    max_tokens: int = 128,
    batch_size: int = 8,
) -> OpenAIJudge | LocalJudge:
    """Build the rating judge: an API judge or a local model, behind the same ``rate_many``.

    Args:
        engine: ``openai`` (any OpenAI-compatible endpoint) or ``local`` (a transformers model
            whose scores are read off the next-token distribution; no server).
        model: The judge model (e.g. ``gpt-4o-mini``, ``smollm2-135m-offline``).
        base_url: The endpoint (default: ``$OPENAI_BASE_URL``, else OpenAI).
        api_key: The key (default: ``$OPENAI_API_KEY``); never logged or cached.
        max_concurrency: Requests in flight.
        requests_per_minute: Client-side request rate limit.
        tokens_per_minute: Client-side token rate limit.
        max_retries: Retries of a failed request (429, 5xx, timeouts) with backoff.
        timeout: Seconds per request.
        retry_base_delay: First backoff delay in seconds (doubled per retry, with jitter).
        cache_dir: Folder of the reply cache (None: no cache).
        prices: Extra ``{model: (input, output)}`` USD per 1M tokens for the cost meter.
        json_mode: Ask for a JSON object (dropped if the server rejects it).
        logprobs: Ask for logprobs to compute the expected score (dropped if rejected).
        temperature: Sampling temperature of the first attempt.
        max_tokens: Reply length limit.
        batch_size: Rows per forward pass of the local judge.

    Returns:
        An :class:`OpenAIJudge` or a :class:`LocalJudge` (both are a :class:`Judge`).

    Example:
        >>> judge = make_judge("openai", "gpt-4o-mini", base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
        >>> judge.name
        'openai:gpt-4o-mini'
    """
    if engine == "local":
        return LocalJudge(model, batch_size=batch_size)
    if engine != "openai":
        raise ValueError(f"unknown judge engine {engine!r}; expected 'openai' or 'local'")
    return OpenAIJudge(
        model,
        json_mode=json_mode,
        logprobs=logprobs,
        temperature=temperature,
        max_tokens=max_tokens,
        base_url=base_url,
        api_key=api_key,
        max_concurrency=max_concurrency,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        max_retries=max_retries,
        timeout=timeout,
        cache_dir=cache_dir,
        prices=prices,
        base_delay=retry_base_delay,
    )
