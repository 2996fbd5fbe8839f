"""Format reward: 0.5 for the ``<think>..</think><answer>..</answer>`` shape + 0.5 for the task's
answer pattern.

``reference`` reproduces the reference scorer, leniencies included (case-insensitive patterns found
anywhere, mcq letters and tfq verdicts unchecked, ``para_mixup`` scored for free) and its task-name
handling: only the exact ``<task>_mixup`` keys earn the task half (``qa``, ``QA_mixup``, None or an
unknown name: structure only). ``strict`` checks the answer body line by line: exactly one think and one non-empty answer
block, a valid mcq letter, a True/False verdict, and a real paragraph for ``para``.
"""

from __future__ import annotations

import re
from typing import Literal

from lmmixup_hf.rewards.common import reference_task, task_of

FormatMode = Literal["reference", "strict"]

_FLAGS = re.DOTALL | re.IGNORECASE
_REF_STRUCTURE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", _FLAGS)
_REF_TASK = {
    "qa": re.compile(r"<answer>.*?Q:.*?A:.*?</answer>", _FLAGS),
    "mcq": re.compile(r"<answer>.*?Q:.*?A\).*?B\).*?C\).*?D\).*?Answer:.*?</answer>", _FLAGS),
    "cs": re.compile(r"<answer>.*?C:.*?S:.*?</answer>", _FLAGS),
    "tfq": re.compile(r"<answer>.*?Answer:.*?</answer>", _FLAGS),
    "para": None,  # the reference gives para its 0.5 without looking
}

_STRICT_STRUCTURE = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_STRICT_TASK = {
    "qa": re.compile(r"^Q:[ \t]*\S.*?^A:[ \t]*\S", re.DOTALL | re.MULTILINE),
    "mcq": re.compile(
        r"^Q:[ \t]*\S.*?^A\)[ \t]*\S.*?^B\)[ \t]*\S.*?^C\)[ \t]*\S.*?^D\)[ \t]*\S.*^Answer:[ \t]*[A-D][ \t]*\.?\Z",
        re.DOTALL | re.MULTILINE,
    ),
    "cs": re.compile(r"^C:[ \t]*\S.*?^S:[ \t]*\S", re.DOTALL | re.MULTILINE),
    "tfq": re.compile(r"\S.*^Answer:[ \t]*(True|False)[ \t]*\.?\Z", re.DOTALL | re.MULTILINE | re.IGNORECASE),
}
_TEMPLATE_LINE = re.compile(r"^\s*(Q:|A:|C:|S:|Answer:|[A-D]\))", re.MULTILINE)
_MIN_PARAGRAPH_WORDS = 12


def _strict_para(answer: str) -> bool:
    """A paragraph: enough prose, at least one full sentence, and no qa/mcq/cs/tfq template lines."""
    return (
        len(answer.split()) >= _MIN_PARAGRAPH_WORDS
        and re.search(r"[.!?](\s|$)", answer) is not None
        and _TEMPLATE_LINE.search(answer) is None
    )


def format_score(text: str, task_type: str | None, mode: FormatMode = "reference") -> float | None:
    """One completion's format score in {0, 0.5, 1}; None in strict mode when the task is unknown."""
    if mode == "reference":
        task = reference_task(task_type)
        score = 0.5 if _REF_STRUCTURE.match(text) else 0.0
        if task is not None:
            pattern = _REF_TASK[task]
            if pattern is None or pattern.search(text):
                score += 0.5
        return score
    if mode != "strict":
        raise ValueError(f"unknown format mode {mode!r}; use reference or strict")
    task = task_of(task_type)
    if task is None:
        return None
    m = _STRICT_STRUCTURE.fullmatch(text)
    if m is None or _has_extra_tags(m.group("think")) or _has_extra_tags(m.group("answer")):
        return 0.0
    answer = m.group("answer").strip()
    if not answer:
        return 0.0
    ok = _strict_para(answer) if task == "para" else _STRICT_TASK[task].search(answer) is not None
    return 0.5 + (0.5 if ok else 0.0)


def _has_extra_tags(body: str) -> bool:
    return re.search(r"</?(think|answer)>", body, re.IGNORECASE) is not None


from lmmixup_hf.rewards.base import Reward  # noqa: E402  (the scoring above has no dependencies; the callable wraps it)


class FormatReward(Reward):
    name = "format_reward"

    def score(self, texts, task_types, outputs):
        return [format_score(t, task, self.config.format) for t, task in zip(texts, task_types)]
