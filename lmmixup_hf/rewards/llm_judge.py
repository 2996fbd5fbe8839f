"""The LLM judge as an async TRL reward in [0, 1] (GRPO runs async rewards concurrently).

The reward is the judge's overall score mapped from 1-10 onto [0, 1]; the probability-weighted
(G-Eval) score is used when the endpoint returns logprobs, as it is smoother than the integer.
A completion the judge could not rate gets ``None`` (TRL ignores it), never an invented value.

>>> reward = JudgeReward(model="gpt-4o-mini", base_url="http://localhost:8000/v1")
>>> trainer = GRPOTrainer(..., reward_funcs=[reward])
"""

from __future__ import annotations

import os
from typing import Any

from lmmixup_hf.data.schema import RAW_MAX, RAW_MIN, TASK_TYPES
from lmmixup_hf.judge.judges import JudgeItem, OpenAIJudge, Rating, rubric_kind
from lmmixup_hf.models.llm_client import map_bounded
from lmmixup_hf.rewards.common import column, completion_text, extract_answer, reference_text, task_of


def _prompt_text(prompt: Any) -> str:
    """A prompt as text: a str, or the user turns of a conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n\n".join(m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user")
    return ""


def rating_to_reward(rating: Rating) -> float | None:
    """(overall - 1) / 9, using the expected score when there is one; None when rating failed."""
    if not rating.ok:
        return None
    value = rating.expected if rating.expected is not None else float(rating.raw)  # type: ignore[arg-type]
    return min(1.0, max(0.0, (value - RAW_MIN) / (RAW_MAX - RAW_MIN)))


class JudgeReward:
    """``await reward(prompts, completions, task_type=..., output=...) -> list[float | None]``.

    ``mode="answer"`` rates the ``<answer>`` body with the row's task rubric (how the method
    re-rates distilled samples); ``mode="pair"`` rates prompt + completion with the general rubric.
    ``reference_aware=True`` shows the dataset's ``output`` column to the judge as a reference.
    Settings default to ``LMMIXUP_JUDGE_MODEL``, ``LMMIXUP_JUDGE_BASE_URL`` (else
    ``OPENAI_BASE_URL``) and ``OPENAI_API_KEY``.
    """

    __name__ = "judge_reward"

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        mode: str = "answer",
        reference_aware: bool = False,
        max_concurrency: int = 32,
        **judge_kwargs: Any,
    ):
        if mode not in ("answer", "pair"):
            raise ValueError(f"mode must be 'answer' or 'pair', got {mode!r}")
        self.model = model or os.environ.get("LMMIXUP_JUDGE_MODEL", "gpt-4o-mini")
        self.base_url = base_url or os.environ.get("LMMIXUP_JUDGE_BASE_URL") or None
        self.mode = mode
        self.reference_aware = reference_aware
        self.max_concurrency = max_concurrency
        self.judge_kwargs = judge_kwargs
        self._judge: OpenAIJudge | None = None

    @property
    def judge(self) -> OpenAIJudge:
        if self._judge is None:
            if "cache_dir" not in self.judge_kwargs:
                from lmmixup_hf.models.registry import cache_root

                self.judge_kwargs["cache_dir"] = cache_root() / "llm"
            self._judge = OpenAIJudge(
                self.model, base_url=self.base_url, max_concurrency=self.max_concurrency, **self.judge_kwargs
            )
        return self._judge

    def __getstate__(self) -> dict[str, Any]:  # picklable for multiprocess data loaders: no live client
        return {**self.__dict__, "_judge": None}

    def items(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[JudgeItem | None]:
        n = len(completions)
        tasks, refs = column(kwargs, "task_type", n), column(kwargs, "output", n)
        out: list[JudgeItem | None] = []
        for prompt, completion, task, ref in zip(prompts or [None] * n, completions, tasks, refs, strict=True):
            text = completion_text(completion)
            if self.mode == "answer":
                body = extract_answer(text)
                kind = task_of(task) if task_of(task) in TASK_TYPES else "general"
            else:
                body = f"Instruction:\n{_prompt_text(prompt)}\n\nResponse:\n{text}" if text.strip() else ""
                kind = "general"
            reference = reference_text(ref) if self.reference_aware else None
            out.append(JudgeItem(body, rubric_kind(kind), reference) if body.strip() else None)
        return out

    async def __call__(
        self, prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any
    ) -> list[float | None]:
        completions = list(completions or [])
        items = self.items(list(prompts) if prompts is not None else None, completions, **kwargs)
        judge = self.judge

        async def one(i: int) -> float | None:
            item = items[i]
            if item is None:  # nothing to rate: an empty answer earns nothing
                return 0.0
            return rating_to_reward(await judge.arate(item))

        return await map_bounded(one, len(items), self.max_concurrency)


_default: JudgeReward | None = None


async def judge_reward(
    prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """The LLM-judge reward configured from the environment (``LMMIXUP_JUDGE_*``, ``OPENAI_*``)."""
    global _default
    if _default is None:
        _default = JudgeReward()
    return await _default(prompts, completions, **kwargs)
