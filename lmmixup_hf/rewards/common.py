"""Completion handling shared by every reward: text of a completion, the answer body, task names.

TRL hands a reward either plain strings (standard datasets) or lists of messages (conversational
datasets); anything else, or a malformed message, reads as the empty string so a reward never
raises mid-training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from lmmixup_hf.data.schema import normalize_task_type

Extraction = Literal["reference", "fixed"]

_ANSWER_CASED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_ANYCASE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?(think|answer)>", re.IGNORECASE)


def completion_text(completion: Any) -> str:
    """The assistant text of one completion: a str, or the content of the last assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        content = completion.get("content")
        return content if isinstance(content, str) else ""
    if isinstance(completion, Sequence):
        for message in reversed(completion):
            if isinstance(message, Mapping) and message.get("role", "assistant") == "assistant":
                content = message.get("content")
                return content if isinstance(content, str) else ""
    return ""


def extract_answer(text: str, extraction: Extraction = "fixed") -> str:
    """The answer body that quality and alignment score.

    ``reference``: the first case-sensitive ``<answer>`` block, else the whole stripped response
    (think block included), as the reference did. ``fixed``: case-insensitive, and without an
    answer block the reasoning and stray tags are removed, so ``<think>`` text is never scored.
    """
    if extraction == "reference":
        m = _ANSWER_CASED.search(text)
        return m.group(1).strip() if m else text.strip()
    m = _ANSWER_ANYCASE.search(text)
    if m:
        return m.group(1).strip()
    return _TAG.sub("", _THINK_BLOCK.sub("", text)).strip()


def task_of(value: Any) -> str | None:
    """``qa_mixup`` / ``qa`` / aliases -> ``qa``; None or unknown -> None (never raises)."""
    if value is None or value == "":
        return None
    try:
        return normalize_task_type(str(value))
    except ValueError:
        return None


REFERENCE_TASK_NAMES = {
    "qa_mixup": "qa",
    "mcq_mixup": "mcq",
    "cs_mixup": "cs",
    "tfq_mixup": "tfq",
    "para_mixup": "para",
}


def reference_task(value: Any) -> str | None:
    """The task as the reference scorer reads ``task_type``: only the exact MIXTURE keys
    (``qa_mixup``, ``mcq_mixup``, ``cs_mixup``, ``tfq_mixup``, ``para_mixup``) name a task; ``qa``,
    ``QA_mixup``, None or anything else names none."""
    return REFERENCE_TASK_NAMES.get(value) if isinstance(value, str) else None


def reference_target(value: Any) -> str | None:
    """The reference ``output`` as the reference scorer embeds it: the string as given, empty or
    blank included; None only when there is no string at all (the reward does not apply)."""
    return value if isinstance(value, str) else None


def column(kwargs: Mapping[str, Any], name: str, n: int) -> list[Any]:
    """A dataset column passed by TRL as a list, or ``n`` Nones when the dataset lacks it."""
    values = kwargs.get(name)
    if values is None or isinstance(values, str | bytes) or not isinstance(values, Sequence):
        return [values if isinstance(values, str) else None] * n
    values = list(values)
    return values + [None] * (n - len(values)) if len(values) < n else values[:n]


def reference_text(value: Any) -> str | None:
    """The reference ``output`` as a non-empty string, else None (the reward does not apply)."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None
