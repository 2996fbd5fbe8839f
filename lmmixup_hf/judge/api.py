"""The judge over an OpenAI-compatible endpoint."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lmmixup_hf.judge.parsing import Rating, ReplyParseError, expected_score, make_rating, parse_reply_for
from lmmixup_hf.judge.rubric import RUBRIC_VERSION, JudgeItem, build_judge_messages
from lmmixup_hf.models.llm_client import ChatClient, UsageMeter, map_bounded, run_sync, usage_bar


class OpenAIJudge:
    """The judge over an OpenAI-compatible endpoint (see :class:`~lmmixup_hf.models.llm_client.ChatClient`
    for concurrency, rate limits, retries, cache and cost). JSON mode and logprobs are requested;
    a server that rejects either is retried without it."""

    def __init__(
        self,
        model: str,
        *,
        json_mode: bool = True,
        logprobs: bool = True,
        top_logprobs: int = 10,
        temperature: float = 0.0,
        max_tokens: int = 128,
        parse_retries: int = 2,
        **client_kwargs: Any,
    ):
        self.client = ChatClient(model, **client_kwargs)
        self.name = f"openai:{model}"
        self.params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        if json_mode:
            self.params["response_format"] = {"type": "json_object"}
        if logprobs:
            self.params.update(logprobs=True, top_logprobs=top_logprobs)
        self.parse_retries = parse_retries

    @property
    def usage(self) -> UsageMeter:
        """Requests, tokens and cost of the client."""
        return self.client.usage

    def flush(self) -> None:
        """Commit the reply cache's buffered writes."""
        self.client.flush()

    async def arate(self, item: JudgeItem) -> Rating:
        """Rate one item. An unparseable reply is asked again (a fresh, differently keyed request at a
        higher temperature) up to ``parse_retries`` times, then the rating fails with its error."""
        messages = build_judge_messages(item)
        error = "not attempted"
        for attempt in range(self.parse_retries + 1):
            params = {**self.params, "cache_tag": f"{RUBRIC_VERSION}|{attempt}"}
            if attempt:
                params["temperature"] = max(float(self.params["temperature"]), 0.7)
            result = await self.client.acomplete(messages, **params)
            if not result.ok:
                return Rating(None, None, judge=self.name, error=result.error)
            try:
                dims = parse_reply_for(item.style, result.text)
            except ReplyParseError as e:
                error = f"unparseable reply: {e}"
                self.client.forget(messages, **params)  # a later run asks again instead of replaying it
                continue
            return make_rating(dims, self.name, result.text, expected_score(result.logprobs))
        return Rating(None, None, reply=result.text, judge=self.name, error=error)

    def rate_many(
        self,
        items: Sequence[JudgeItem],
        *,
        on_result: Callable[[int, Rating], None] | None = None,
        desc: str = "rating",
        show_progress: bool = True,
    ) -> list[Rating]:
        async def go() -> list[Rating]:
            try:
                with usage_bar(len(items), desc, self.usage, disable=not show_progress) as progress:
                    return await map_bounded(
                        lambda i: self.arate(items[i]),
                        len(items),
                        self.client.max_concurrency,
                        on_result=on_result,
                        progress=progress,
                    )
            finally:
                await self.client.aclose()

        return run_sync(go())
