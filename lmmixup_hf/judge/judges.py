"""The LLM judge: our rubric prompts, tolerant reply parsing and G-Eval style expected scores, over
any OpenAI-compatible endpoint (:class:`OpenAIJudge`) or a local transformers model
(:class:`LocalJudge`). Both return :class:`Rating` objects through the same ``rate_many``.

The rubric follows the method: Rarity, Complexity, Informativeness and Overall, each an integer
1-10, reference-free by default (only the item is shown). ``score = clip(overall, 4, 9) - 4``.
A reply that cannot be parsed is never turned into a score: the rating fails with its error.

``style="reference"`` swaps in the reference rating script's prompt (one user message, no system
turn) and its reply parsing (first JSON array else object, values cut to int, ``Overall rating``
else ``Overall``); see ``docs/rating.md``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmmixup_hf.data.schema import RAW_MAX, RAW_MIN, TASK_TYPES, compress_score
from lmmixup_hf.models.llm_client import ChatClient, map_bounded, run_sync, usage_bar

logger = logging.getLogger(__name__)

RUBRIC_VERSION = "lmmixup-rubric-1"  # bump when the prompts below change: it is part of the cache key
DIMENSIONS = ("rarity", "complexity", "informativeness", "overall")
KINDS = ("general", *TASK_TYPES)

JUDGE_SYSTEM = (
    "You rate the quality of training data for language models. You are strict, consistent and use the whole "
    "1-10 scale. You reply with a single JSON object and nothing else."
)

# kind -> (what the item is, the header above it, what to check for this kind)
RUBRICS: dict[str, tuple[str, str, str]] = {
    "general": (
        "an instruction paired with a response",
        "Instruction-Response Pair",
        "Check that the response follows the instruction completely, is correct, and is clear and well organised.",
    ),
    "qa": (
        "a question-answer pair",
        "Question-Answer Pair",
        "Check that the question is well posed and self-contained and that the answer is correct, complete and "
        "directly addresses it.",
    ),
    "mcq": (
        "a multiple-choice question",
        "Multiple-Choice Question",
        "Check that the stem is clear, that there are four distinct plausible options, and that exactly one "
        "option is correct and matches the stated answer key.",
    ),
    "tfq": (
        "a true/false question",
        "True/False Question",
        "Check that the statement is unambiguous and that the stated answer (True or False) is correct.",
    ),
    "cs": (
        "a category-statement example",
        "Category-Statement Example",
        "Check that the statement is accurate, complete and really belongs to the stated category.",
    ),
    "para": (
        "a paragraph",
        "Paragraph",
        "Check that the paragraph is factual, coherent, non-repetitive and covers its topic with substance.",
    ),
}

_SCALE = (
    "Score each dimension with an integer from 1 (worst) to 10 (best):\n"
    "- rarity: how uncommon and non-trivial the content is compared with typical data of this kind;\n"
    "- complexity: how much knowledge or multi-step reasoning it takes to produce;\n"
    "- informativeness: how much correct, useful information it carries;\n"
    "- overall: its overall value as a training example; errors, incoherence or an unusable format make it low."
)
_FORMAT = 'Reply with only this JSON object:\n{"rarity": <int>, "complexity": <int>, "informativeness": <int>, "overall": <int>}'


# The reference rating script's rubric: kind -> (what the item is, its header). Kinds it does not
# know are rated as a QA pair, as it did.
REFERENCE_RUBRICS: dict[str, tuple[str, str]] = {
    "qa": ("**single** QA pair", "QA Pair"),
    "mcq": ("**single** MCQ item", "MCQ Item"),
    "para": ("**single** merged paragraph", "Paragraph"),
    "tfq": ("**single** True/False question", "TFQ"),
    "cs": ("**single** category–statement example", "CS Example"),
}
STYLES = ("ours", "reference")
LOCAL_REFERENCE_KEYS = ("Rarity", "Complexity", "Informativeness", "Overall rating")


@dataclass(frozen=True)
class JudgeItem:
    """What the judge sees: the item text, which rubric to use, an optional reference answer, and
    the prompt style (``ours`` or the reference script's ``reference``)."""

    text: str
    kind: str = "general"
    reference: str | None = None
    style: str = "ours"


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


def rubric_kind(kind: str | None) -> str:
    if kind in (None, "", "auto"):
        return "general"
    if kind not in RUBRICS:
        raise ValueError(f"unknown rubric {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def reference_kind(task_type: Any) -> str:
    """The reference rubric for a row's task type: qa, mcq, para, tfq or cs (``qa_mixup`` style
    names accepted); anything else is rated as a QA pair, as the reference's inference fell back."""
    from lmmixup_hf.data.schema import normalize_task_type

    try:
        kind = normalize_task_type(task_type) if task_type else "qa"
    except ValueError:
        return "qa"
    return kind if kind in REFERENCE_RUBRICS else "qa"


def reference_rubric_prompt(kind: str | None, text: str) -> str:
    """The reference script's whole prompt for one item: the rubric, the item under ``### Output:``
    and a ``### Rating:`` cue. Only the item is shown (no reference answer)."""
    what, header = REFERENCE_RUBRICS.get(kind or "qa", REFERENCE_RUBRICS["qa"])
    rubric = (
        f"You are a data-quality estimator. Rate this {what} on Rarity, Complexity, Informativeness, and "
        "Overall (1-10 integers).\nReturn ONLY a JSON object like:\n"
        '{ "Rarity": <int>, "Complexity": <int>, "Informativeness": <int>, "Overall rating": <int> }\n\n'
        f"### {header}:\n"
    )
    return f"{rubric}\n\n### Output:\n{text.strip()}\n\n### Rating:"


def build_judge_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The judge prompt: a system turn and one user turn with the rubric, then the item (the
    reference style: its single user turn)."""
    if item.style == "reference":
        return [{"role": "user", "content": reference_rubric_prompt(item.kind, item.text)}]
    if item.style != "ours":
        raise ValueError(f"unknown rubric style {item.style!r}; expected one of {', '.join(STYLES)}")
    what, header, checks = RUBRICS[rubric_kind(item.kind)]
    parts = [f"Rate {what} as training data for a language model.", _SCALE, checks]
    if item.reference:
        parts.append(
            "A reference answer is shown after the item. Lower correctness-related scores when the item "
            "contradicts it; do not reward copying it."
        )
    else:
        parts.append("Judge only what is shown.")
    parts += [_FORMAT, f"### {header}\n{item.text.strip()}"]
    if item.reference:
        parts.append(f"### Reference\n{item.reference.strip()}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


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


# -- judges --------------------------------------------------------------------------------------
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
    def usage(self) -> Any:
        return self.client.usage

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


class _LocalUsage:
    """Usage counters shaped like :class:`~lmmixup_hf.models.llm_client.UsageMeter` (cost is always 0)."""

    def __init__(self, model: str):
        self.model, self.n_requests, self.prompt_tokens = model, 0, 0
        self.n_cached = self.n_failed = self.completion_tokens = 0
        self.cost_usd = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n_requests": self.n_requests,
            "prompt_tokens": self.prompt_tokens,
            "cost_usd": 0.0,
        }


_ITEM_MARK = "\u241fITEM\u241f"  # stands for the item text when the shared prompt prefix is cut out


class LocalJudge:
    """A transformers model as judge, with no server. Each dimension is read off the next-token
    distribution restricted to the score tokens "1".."10" (teacher-forcing the JSON keys), so every
    item gets a valid score; the overall's expected value is recorded as ``expected``.

    The prompt is a long rubric (system turn, scale, checks, format: ~280 tokens) followed by a
    short item. With ``prefix_cache`` (default) the rubric is encoded once per rubric kind and its
    KV cache is shared by every row, so a row costs only its own tokens; rows are batched by rubric
    and length to keep padding small. The scores are those of the full prompt (a test checks
    equality with ``prefix_cache=False``, which encodes every prompt whole)."""

    def __init__(
        self,
        model: str = "smollm2-135m-offline",
        *,
        device: str | None = None,
        batch_size: int = 8,
        max_item_tokens: int = 768,
        prefix_cache: bool = True,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lmmixup_hf.models.registry import resolve_model

        path = resolve_model(model)
        self.name = f"local:{model}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path).to(self.device).eval()
        self.batch_size = batch_size
        self.max_item_tokens = max_item_tokens
        self.prefix_cache = prefix_cache
        self._prefixes: dict[tuple[str, str, bool], tuple[list[int], Any]] = {}
        self.usage = _LocalUsage(model)
        ids, values = [], []
        for v in range(RAW_MIN, RAW_MAX + 1):
            tok = self.tokenizer.encode(str(v), add_special_tokens=False)
            if len(tok) == 1:  # "10" is two tokens in many vocabularies; then the scale is 1-9
                ids.append(tok[0])
                values.append(v)
        if not ids:
            raise ValueError(f"{model}: the tokenizer has no single-token digits to score with")
        self.score_ids = torch.tensor(ids)
        self.score_values = torch.tensor(values, dtype=torch.float32)

    def _truncate(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_item_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_item_tokens]) + " [...]"

    def _prompt(self, item: JudgeItem) -> str:
        item = JudgeItem(
            self._truncate(item.text),
            item.kind,
            self._truncate(item.reference) if item.reference else None,
            item.style,
        )
        return self.tokenizer.apply_chat_template(
            build_judge_messages(item), tokenize=False, add_generation_prompt=True
        )

    def _prefix(self, item: JudgeItem) -> tuple[list[int], Any]:
        """The token ids of the prompt up to the item text for this rubric, and their KV cache
        (computed once per rubric kind, reference setting and style)."""
        import torch

        kind = item.kind if item.style == "reference" else rubric_kind(item.kind)
        key = (item.style, kind, bool(item.reference))
        if key not in self._prefixes:
            marked = JudgeItem(_ITEM_MARK, kind, _ITEM_MARK if item.reference else None, style=item.style)
            text = self.tokenizer.apply_chat_template(
                build_judge_messages(marked), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer.encode(text.split(_ITEM_MARK)[0], add_special_tokens=False)
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
            self.usage.n_requests += 1
            self.usage.prompt_tokens += len(ids)
            self._prefixes[key] = (ids, out.past_key_values)
        return self._prefixes[key]

    def _score_batch(
        self, prompts: list[str], prefix: tuple[list[int], Any] | None = None, style: str = "ours"
    ) -> list[tuple[dict[str, int], float, str]]:
        """One forward pass over the prompts, then one short cached step per further dimension:
        ``{"rarity": `` -> pick -> ``7, "complexity": `` -> pick -> ... The picked value is the most
        likely score token; for the overall we also keep the expected value. The reference style
        forces its own keys (``"Rarity"`` ... ``"Overall rating"``).

        With ``prefix`` (ids and KV cache that every prompt starts with), only the rest of each
        prompt is encoded, left-padded after the shared prefix."""
        import copy

        import torch

        keys = dict(zip(DIMENSIONS, LOCAL_REFERENCE_KEYS if style == "reference" else DIMENSIONS, strict=True))
        tok = self.tokenizer
        n = len(prompts)
        dims: list[dict[str, int]] = [{} for _ in prompts]
        replies = ["{" for _ in prompts]
        expected = [0.0] * n
        texts = [p + '{"' + keys[DIMENSIONS[0]] + '": ' for p in prompts]
        if prefix is None:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            input_ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            past = None
        else:
            head, cache = prefix
            rest = [tok.encode(t, add_special_tokens=False)[len(head) :] for t in texts]
            width = max(len(r) for r in rest)
            pad = tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=self.device)
            own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=self.device)
            mask = torch.cat([torch.ones((n, len(head)), dtype=own.dtype, device=self.device), own], dim=1)
            positions = len(head) + (own.cumsum(-1) - 1).clamp(min=0)
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
        score_ids = self.score_ids.to(self.device)
        for j, dim in enumerate(DIMENSIONS):
            with torch.inference_mode():
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                )
            past = out.past_key_values
            self.usage.n_requests += 1
            self.usage.prompt_tokens += int(input_ids.numel())
            probs = torch.softmax(out.logits[:, -1, :].float()[:, score_ids], dim=-1).cpu()
            best = probs.argmax(dim=-1)
            for r in range(n):
                value = int(self.score_values[best[r]])
                dims[r][dim] = value
                replies[r] += f'"{keys[dim]}": {value}' + (", " if j < len(DIMENSIONS) - 1 else "}")
                if dim == "overall":
                    expected[r] = round(float((probs[r] * self.score_values).sum()), 4)
            if j == len(DIMENSIONS) - 1:
                break
            # teacher-force the picked value and the next key; the same suffix length for every row
            suffix = tok.encode(f', "{keys[DIMENSIONS[j + 1]]}": ', add_special_tokens=False)
            step = torch.tensor([[int(self.score_ids[best[r]]), *suffix] for r in range(n)], device=self.device)
            positions = positions[:, -1:] + torch.arange(1, step.shape[1] + 1, device=self.device)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            input_ids = step
        return [(d, e, rep) for d, e, rep in zip(dims, expected, replies, strict=True)]

    def rate_many(
        self,
        items: Sequence[JudgeItem],
        *,
        on_result: Callable[[int, Rating], None] | None = None,
        desc: str = "rating",
        show_progress: bool = True,
    ) -> list[Rating]:
        out: list[Rating | None] = [None] * len(items)
        prompts = [self._prompt(it) for it in items]
        batches = self._batches(items, prompts)
        with usage_bar(len(items), desc, self.usage, disable=not show_progress) as progress:  # type: ignore[arg-type]
            for rows, prefix, style in batches:
                scored = self._score_batch([prompts[i] for i in rows], prefix, style)
                for i, (dims, exp, reply) in zip(rows, scored, strict=True):
                    rating = out[i] = make_rating(dims, self.name, reply, exp)
                    if on_result is not None:
                        on_result(i, rating)
                    progress()
        return out  # type: ignore[return-value]

    def _batches(self, items: Sequence[JudgeItem], prompts: list[str]) -> list[tuple[list[int], Any, str]]:
        """Row batches of one rubric style, each with the prefix its prompts share (None: encode
        whole prompts).

        With the prefix cache, rows are grouped by rubric and sorted by length, so that a batch
        pads little; a prompt that does not tokenise to its rubric's prefix (a tokenizer merging
        across the boundary) is encoded whole, so the scores never depend on the shortcut."""
        groups: dict[tuple[str, tuple[int, ...] | None], list[tuple[int, int]]] = {}
        prefixes: dict[tuple[int, ...], Any] = {}
        for i, item in enumerate(items):
            if not self.prefix_cache:
                groups.setdefault((item.style, None), []).append((i, i))  # input order
                continue
            head, cache = self._prefix(item)
            first = LOCAL_REFERENCE_KEYS[0] if item.style == "reference" else DIMENSIONS[0]
            ids = self.tokenizer.encode(prompts[i] + '{"' + first + '": ', add_special_tokens=False)
            key = tuple(head) if ids[: len(head)] == head and len(ids) > len(head) else None
            if key is not None:
                prefixes[key] = (head, cache)
            groups.setdefault((item.style, key), []).append((len(ids), i))
        out = []
        for (style, key), rows in groups.items():
            rows.sort()
            for s in range(0, len(rows), self.batch_size):
                batch = [i for _, i in rows[s : s + self.batch_size]]
                out.append((batch, None if key is None else prefixes[key], style))
        return out


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
    """``engine="openai"``: any OpenAI-compatible endpoint; ``engine="local"``: a transformers model."""
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
