"""What the stages and executors need of a judge: :class:`Judge`. :class:`~lmmixup_hf.judge.api.OpenAIJudge`
and :class:`~lmmixup_hf.judge.local.LocalJudge` are two; a test double or another backend is a third."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from lmmixup_hf.judge.parsing import Rating
from lmmixup_hf.judge.rubric import JudgeItem
from lmmixup_hf.models.pricing import Usage


@runtime_checkable
class Judge(Protocol):
    """Rates items; a failed rating carries its error and never a made-up score."""

    name: str  # recorded in each rating, e.g. "openai:gpt-4o-mini"

    @property
    def usage(self) -> Usage:
        """Requests, tokens and cost so far."""
        ...

    def rate_many(
        self,
        items: Sequence[JudgeItem],
        *,
        on_result: Callable[[int, Rating], None] | None = None,
        desc: str = "rating",
        show_progress: bool = True,
    ) -> list[Rating]:
        """One rating per item, in order; ``on_result(position, rating)`` as each finishes."""
        ...

    def flush(self) -> None:
        """Commit anything buffered (a reply cache), e.g. before a worker may be stopped."""
        ...
