"""From a judge reply to a :class:`Rating`: tolerant parsing of our rubric's JSON, the reference
script's parsing, and G-Eval style expected scores. ``score = clip(overall, 4, 9) - 4``. A reply
that cannot be parsed is never turned into a score: the rating fails with its error.

Pure text processing: no model, no HTTP client (a layering contract in ``pyproject.toml``)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmmixup_hf.data.schema import RAW_MAX, RAW_MIN, compress_score
from lmmixup_hf.judge.rubric import DIMENSIONS


@dataclass
class Rating:
    raw: int | None  # overall, 1-10
    score: int | None  # compress_score(raw), 0-5
    dims: dict[str, int | None] = field(default_factory=dict)
    expected: float | None = None  # probability-weighted overall (G-Eval), when logprobs were available
    reply: str | None = None  # the judge's raw reply
    judge: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.raw is not None

    @classmethod
    def from_struct(cls, struct: Mapping[str, Any]) -> Rating:
        """The rating a ``rating`` column value (:meth:`as_struct`) came from."""
        fields = ("raw", "score", "dims", "expected", "reply", "judge")
        return cls(**{f: struct[f] for f in fields})

    def as_struct(self) -> dict[str, Any]:
        """The ``rating`` column value (DESIGN §3)."""
        return {
            "raw": self.raw,
            "score": self.score,
            "dims": {d: self.dims.get(d) for d in DIMENSIONS},
            "judge": self.judge,
            "expected": self.expected,
            "reply": self.reply,
        }


# -- parsing -------------------------------------------------------------------------------------
class ReplyParseError(ValueError):
    pass


_KEY = {
    "rarity": "rarity",
    "complexity": "complexity",
    "informativeness": "informativeness",
    "overall": "overall",
    "overall rating": "overall",
    "overall_rating": "overall",
    "overall score": "overall",
    "score": "overall",
    "rating": "overall",
    "overall_score": "overall",
}
_PAIR = re.compile(
    r'"?\b(rarity|complexity|informativeness|overall[ _]?(?:rating|score)?)\b"?\s*[:=]\s*"?(\d+(?:\.\d+)?)', re.I
)
_OBJECT = re.compile(r"\{[^{}]*\}", re.S)


def _dims_from_mapping(obj: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in obj.items():
        name = _KEY.get(str(k).strip().lower())
        if name is None or name in out:
            continue
        try:
            value = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value) or not RAW_MIN <= value <= RAW_MAX:
            raise ReplyParseError(f"{name} = {v!r} is outside {RAW_MIN}-{RAW_MAX}")
        out[name] = int(round(value))
    return out


def parse_reply(text: str | None) -> dict[str, int]:
    """Dimensions from a judge reply: a JSON object (also inside code fences or prose), else
    ``key: value`` pairs. Raises :class:`ReplyParseError` when no in-range overall score is found."""
    if not text or not text.strip():
        raise ReplyParseError("empty reply")
    candidates: list[dict[str, Any]] = []
    try:
        whole = json.loads(text.strip().removeprefix("```json").removeprefix("```").removesuffix("```"))
        if isinstance(whole, dict):
            candidates.append(whole)
        elif isinstance(whole, list):
            candidates += [x for x in whole if isinstance(x, dict)]
    except json.JSONDecodeError:
        for m in _OBJECT.finditer(text):
            try:
                obj = json.loads(m.group(0))
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                candidates.append(obj)
    for obj in candidates:
        dims = _dims_from_mapping(obj)
        if "overall" in dims:
            return dims
    pairs = {}
    for m in _PAIR.finditer(text):
        pairs.setdefault(m.group(1), m.group(2))
    dims = _dims_from_mapping(pairs)
    if "overall" in dims:
        return dims
    raise ReplyParseError(f"no overall score in reply: {text[:200]!r}")


def _balanced(text: str, open_: str, close: str) -> str | None:
    """The leftmost balanced ``open_ ... close`` span (nesting counted), as a recursive pattern
    finds it; None when there is none."""
    start = text.find(open_)
    while start != -1:
        depth = 0
        for j in range(start, len(text)):
            depth += (text[j] == open_) - (text[j] == close)
            if depth == 0:
                return text[start : j + 1]
        start = text.find(open_, start + 1)
    return None


_REFERENCE_KEYS = (("Rarity", "rarity"), ("Complexity", "complexity"), ("Informativeness", "informativeness"))


def _reference_int(value: Any, name: str) -> int:
    """Python's ``int()`` of a JSON value, as the reference applied it: 7.6 -> 7, "8" -> 8."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ReplyParseError(f"{name} = {value!r} is not a number the reference could read")


def parse_reply_reference(text: str | None) -> dict[str, int]:
    """The reference script's parsing: the first balanced JSON array in the reply, else the first
    object; its first object; each of Rarity, Complexity, Informativeness through ``int()``
    (missing: 0), overall from ``Overall rating``, else ``Overall``.

    Where the reference scored 0 for everything (no JSON, invalid JSON, no overall), this raises
    :class:`ReplyParseError`: the rating fails instead of becoming a score.
    """
    if not text or not text.strip():
        raise ReplyParseError("empty reply")
    body = _balanced(text.strip(), "[", "]") or _balanced(text.strip(), "{", "}")
    if body is None:
        raise ReplyParseError(f"no JSON in reply: {text[:200]!r}")
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError as e:
        raise ReplyParseError(f"invalid JSON in reply ({e}): {body[:200]!r}") from None
    objs = [parsed] if isinstance(parsed, dict) else parsed
    if not objs or not isinstance(objs[0], dict):
        raise ReplyParseError(f"no JSON object in reply: {body[:200]!r}")
    obj = objs[0]
    dims = {name: _reference_int(obj.get(key, 0), key) for key, name in _REFERENCE_KEYS}
    overall = _reference_int(obj.get("Overall rating", 0) or obj.get("Overall", 0), "Overall")
    if overall == 0:
        raise ReplyParseError(f"no Overall in reply: {body[:200]!r}")
    dims["overall"] = overall
    return dims


def parse_reply_for(style: str, text: str | None) -> dict[str, int]:
    return parse_reply_reference(text) if style == "reference" else parse_reply(text)


_DIGITS = re.compile(r"^\W*(\d{1,2})\W*$")
_OVERALL_VALUE = re.compile(r"overall[^0-9]{0,24}?(\d)", re.I)


def expected_score(logprobs: Sequence[dict] | None) -> float | None:
    """G-Eval: the probability-weighted overall score from the top logprobs at the token that carries
    the overall value. None when the position or any score-token mass is missing."""
    if not logprobs:
        return None
    tokens = [t.get("token", "") for t in logprobs]
    text = "".join(tokens)
    matches = list(_OVERALL_VALUE.finditer(text))
    if not matches:
        return None
    target = matches[-1].start(1)
    i, end = 0, 0  # the token whose span holds the digit (a plain loop: numpy is slower on ~30 tokens)
    for i, tok in enumerate(tokens):  # noqa: B007 - ``i`` is the answer
        end += len(tok)
        if end > target:
            break
    else:
        return None
    total = weighted = 0.0
    for alt in logprobs[i].get("top_logprobs") or [{"token": tokens[i], "logprob": logprobs[i].get("logprob", 0.0)}]:
        m = _DIGITS.match(alt.get("token", ""))
        if not m:
            continue
        value = int(m.group(1))
        if RAW_MIN <= value <= RAW_MAX:
            p = math.exp(float(alt["logprob"]))
            total += p
            weighted += p * value
    return round(weighted / total, 4) if total > 0 else None


def make_rating(dims: dict[str, int], judge: str, reply: str | None, expected: float | None = None) -> Rating:
    raw = dims["overall"]
    return Rating(raw=raw, score=compress_score(raw), dims=dict(dims), expected=expected, reply=reply, judge=judge)
