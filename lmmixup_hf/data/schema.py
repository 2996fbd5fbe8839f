"""The data contract: column names, task types, the score scale and per-row validation.

Every stage reads and writes pools with these columns, so that distilled rows can flow into the
same later stages as original rows (see docs/data-contract in the README).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# -- columns -----------------------------------------------------------------------------------
ID = "id"
PROMPT = "prompt"
COMPLETION = "completion"
SOURCE = "source"
TASK_TYPE = "task_type"
RATING = "rating"
CLUSTER_ID = "cluster_id"
LONG_TAIL = "long_tail"
MEMBER_IDS = "member_ids"

EXTRA = "extra"  # unknown input fields of mixed types, as one JSON string (consistent ones become columns)

BASE_COLUMNS = (ID, PROMPT, COMPLETION, SOURCE, TASK_TYPE)
_CONSUMED = {
    "prompt",
    "instruction",
    "input",
    "question",
    "query",
    "completion",
    "output",
    "answer",
    "response",
    "target",
    "messages",
    ID,
    SOURCE,
    TASK_TYPE,
}

# -- task types --------------------------------------------------------------------------------
TASK_TYPES = ("qa", "mcq", "tfq", "cs", "para")
DEFAULT_TASK_TYPE = "qa"
_TASK_ALIASES = {"paragraph": "para", "paragraphs": "para", "true_false": "tfq", "multiple_choice": "mcq"}

# -- score scale -------------------------------------------------------------------------------
RAW_MIN, RAW_MAX = 1, 10
SCORE_MIN, SCORE_MAX = 0, 5
HIGH_QUALITY_THRESHOLD = 4  # compressed score >= 4  <=>  raw >= 8

DEFAULT_MAX_CHARS = 100_000


# -- exit statuses of every `lmmixup` command (documented in the README) --------------------------
EXIT_OK = 0  # done: every row is in the output or quarantined with a reason
EXIT_FAILED = 1  # a reason outside the input: disk, network, an unexpected error
EXIT_USAGE = 2  # a usage or input error, named in one line
EXIT_PARTIAL = 3  # finished, but rows were left failed (or an input stage was partial): rerun to retry
EXIT_INTERRUPTED = 130  # Ctrl-C: rerun to resume


class LmmixupError(Exception):
    """An error the user can act on; the CLI prints it without a traceback."""

    exit_code = EXIT_USAGE


class PoolFormatError(LmmixupError):
    """The input is not a pool at all (wrong format, unreadable, no usable rows)."""


class ServiceError(LmmixupError):
    """A service we depend on failed (the Hub, an endpoint): not the input's fault."""

    exit_code = EXIT_FAILED


class RowError(ValueError):
    """A single row is unusable; it is quarantined with ``field`` and ``reason``."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def normalize_task_type(value: str | None) -> str:
    """Map MIXTURE's ``qa_mixup`` style names and common aliases onto :data:`TASK_TYPES`."""
    if value is None or value == "":
        return DEFAULT_TASK_TYPE
    name = str(value).strip().lower()
    if name.endswith("_mixup"):
        name = name[: -len("_mixup")]
    name = _TASK_ALIASES.get(name, name)
    if name not in TASK_TYPES:
        raise ValueError(f"unknown task type {value!r}; expected one of {', '.join(TASK_TYPES)}")
    return name


def compress_score(raw: int | float) -> int:
    """The paper's 1-10 -> 0-5 compression: ``clip(raw, 4, 9) - 4``."""
    return int(min(9, max(4, round(raw)))) - 4


def is_high_quality(score: int | float | None, threshold: int = HIGH_QUALITY_THRESHOLD) -> bool:
    return score is not None and score >= threshold


def make_id(prompt: str, completion: str) -> str:
    """A stable id from the content, so reruns and re-orderings keep the same ids."""
    h = hashlib.sha1()
    h.update(prompt.encode("utf-8"))
    h.update(b"\x00")
    h.update(completion.encode("utf-8"))
    return h.hexdigest()[:16]


def text_of(row: Mapping[str, Any]) -> str:
    """The text that represents a row for embedding (prompt and completion together)."""
    return f"{row.get(PROMPT) or ''}\n{row.get(COMPLETION) or ''}".strip()


# -- field mapping -----------------------------------------------------------------------------
PROMPT_KEYS = ("prompt", "instruction", "question", "query")
COMPLETION_KEYS = ("completion", "output", "answer", "response", "target")


def _as_text(row: Mapping[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(key, f"expected a string, got {type(value).__name__}")
    return value


def _from_messages(messages: Any) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise RowError("messages", "expected a non-empty list of {role, content} messages")
    users, assistant = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise RowError("messages", f"message {i} has no string 'content'")
        role = m.get("role")
        if role in ("user", "human", "system") and assistant is None:
            users.append(m["content"])
        elif role in ("assistant", "gpt", "bot") and assistant is None:
            assistant = m["content"]
    if assistant is None:
        raise RowError("messages", "no assistant message")
    return "\n\n".join(users), assistant


def normalize_record(
    row: Any,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    default_source: str = "",
) -> dict[str, Any]:
    """Map one raw record onto the data contract, or raise :class:`RowError`.

    Recognised layouts: ``prompt/completion``, ``instruction/input/output`` (Alpaca; ``input`` is
    appended to the instruction), ``question/answer`` and chat ``messages``. Any other field is kept
    in ``extra`` (one JSON string per row), so nothing is lost and the Arrow schema stays uniform.
    """
    if not isinstance(row, Mapping):
        raise RowError(None, f"expected a JSON object, got {type(row).__name__}")

    if "messages" in row and not any(k in row for k in ("prompt", "instruction", "question")):
        prompt, completion = _from_messages(row["messages"])
    else:
        pkey = next((k for k in PROMPT_KEYS if k in row and row[k] is not None), None)
        ckey = next((k for k in COMPLETION_KEYS if k in row and row[k] is not None), None)
        if pkey is None:
            raise RowError("prompt", "missing (looked for " + ", ".join(PROMPT_KEYS) + ", messages)")
        if ckey is None:
            raise RowError("completion", "missing (looked for " + ", ".join(COMPLETION_KEYS) + ")")
        prompt, completion = _as_text(row, pkey), _as_text(row, ckey)
        if pkey == "instruction" and row.get("input"):
            prompt = f"{prompt}\n\n{_as_text(row, 'input')}"

    if not prompt.strip():
        raise RowError("prompt", "empty")
    if not completion.strip():
        raise RowError("completion", "empty")
    if len(prompt) + len(completion) > max_chars:
        raise RowError("prompt+completion", f"too long ({len(prompt) + len(completion)} > {max_chars} chars)")

    rid = row.get(ID)
    if rid is None or rid == "":
        rid = make_id(prompt, completion)
    elif isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    elif not isinstance(rid, str):
        raise RowError(ID, f"expected a string or integer, got {type(rid).__name__}")

    source = row.get(SOURCE, default_source)
    if source is None:
        source = default_source
    if not isinstance(source, str):
        raise RowError(SOURCE, f"expected a string, got {type(source).__name__}")

    try:
        task_type = normalize_task_type(row.get(TASK_TYPE))
    except ValueError as e:
        raise RowError(TASK_TYPE, str(e)) from None

    out: dict[str, Any] = {ID: rid, PROMPT: prompt, COMPLETION: completion, SOURCE: source, TASK_TYPE: task_type}
    extra = {k: v for k, v in row.items() if k not in _CONSUMED and k not in out}
    if extra:
        out[EXTRA] = json.dumps(extra, ensure_ascii=False, default=str)
    return out
