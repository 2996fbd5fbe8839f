"""Parse a distiller response: ``<think>``/``<answer>`` tags, then the answer into prompt/completion.

The parser never invents content: when a response cannot be read as the task's format it says why
(``ParsedResponse.error``) and the caller quarantines the row. Only the standard library is used.

How each task type's answer becomes a ``prompt``/``completion`` pair (so distilled rows flow into
the same later stages as original pool rows):

========  ===================================================  ==========================================
task      prompt                                               completion
========  ===================================================  ==========================================
``qa``    the text after ``Q:`` (up to the ``A:`` line)        the text after ``A:``
``mcq``   the stem (after ``Q:``) and the option lines         ``Answer: <letter>`` (what an MCQ-tuned
                                                               model is expected to write)
``tfq``   the statement (a leading ``Q:`` is removed)          ``Answer: True`` or ``Answer: False``
``cs``    the category (after ``C:``)                          the statement (after ``S:``)
``para``  the paragraph's first sentence (its topic)           the rest of the paragraph; a one-sentence
                                                               paragraph has an empty prompt
========  ===================================================  ==========================================
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

TASK_TYPES = ("qa", "mcq", "tfq", "cs", "para")

_THINK = re.compile(r"<think>(.*?)(?:</think>|(?=<answer>)|\Z)", re.I | re.S)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.I | re.S)

_Q = re.compile(r"^[ \t]*(?:Q|Question)[ \t]*:[ \t]*", re.I | re.M)
_A = re.compile(r"^[ \t]*(?:A|Answer)[ \t]*:[ \t]*", re.I | re.M)
_OPTION = re.compile(r"^[ \t]*\(?([A-H])[).:][ \t]+(\S.*)$", re.M)
_ANSWER_LINE = re.compile(r"^[ \t]*(?:Correct[ \t]+)?Answer[ \t]*:[ \t]*(.+?)[ \t]*$", re.I | re.M)
_LETTER = re.compile(r"^\(?([A-H])\)?(?:[).:\s]|$)", re.I)
_TRUTH = re.compile(r"^(true|false)\b", re.I)
_C = re.compile(r"^[ \t]*(?:C|Category)[ \t]*:[ \t]*", re.I | re.M)
_S = re.compile(r"^[ \t]*(?:S|Statement)[ \t]*:[ \t]*", re.I | re.M)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


class ParseError(ValueError):
    """The answer does not have the task's format; the message is the reason recorded for the row."""


@dataclass
class ParsedResponse:
    think: str | None
    output: str | None
    prompt: str | None
    completion: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        return {**asdict(self), "parse_ok": self.ok, "parse_error": self.error}


def extract_tags(text: str) -> tuple[str | None, str | None]:
    """``(think, answer)`` bodies, stripped; case-insensitive; a missing closing tag runs to the
    end (or, for ``<think>``, to ``<answer>``). ``None`` where the opening tag is absent."""
    think = _THINK.search(text)
    answer = _ANSWER.search(text)
    return (think.group(1).strip() if think else None, answer.group(1).strip() if answer else None)


def _task(task_type: str) -> str:
    name = str(task_type or "qa").strip().lower()
    name = name[: -len("_mixup")] if name.endswith("_mixup") else name
    if name not in TASK_TYPES:
        raise ParseError(f"unknown task type {task_type!r}")
    return name


def _split_qa(text: str) -> tuple[str, str]:
    q = _Q.search(text)
    if not q:
        raise ParseError("qa: no 'Q:' line")
    a = _A.search(text, q.end())
    if not a:
        raise ParseError("qa: no 'A:' line after the question")
    nxt = _Q.search(text, a.end())  # a second pair means the model listed instead of merging: keep the first
    prompt, completion = text[q.end() : a.start()].strip(), text[a.end() : nxt.start() if nxt else None].strip()
    if not prompt:
        raise ParseError("qa: empty question")
    if not completion:
        raise ParseError("qa: empty answer")
    return prompt, completion


def _split_mcq(text: str) -> tuple[str, str]:
    answers = list(_ANSWER_LINE.finditer(text))
    if not answers:
        raise ParseError("mcq: no 'Answer: <letter>' line")
    last = answers[-1]
    body = text[: last.start()]
    options = list(_OPTION.finditer(body))
    if len(options) < 2:
        raise ParseError(f"mcq: expected at least 2 options like 'A) ...', found {len(options)}")
    letters = [m.group(1).upper() for m in options]
    if letters != [chr(ord("A") + i) for i in range(len(letters))]:
        raise ParseError(f"mcq: options are not labelled A, B, C, ... in order ({', '.join(letters)})")
    letter = _LETTER.match(last.group(1).strip())
    if not letter:
        raise ParseError(f"mcq: answer {last.group(1)!r} is not an option letter")
    if letter.group(1).upper() not in letters:
        raise ParseError(f"mcq: answer {letter.group(1)!r} is not one of the options ({', '.join(letters)})")
    q = _Q.search(body, 0, options[0].start())
    stem = body[q.end() if q else 0 : options[0].start()].strip()
    if not stem:
        raise ParseError("mcq: empty question stem")
    option_lines = "\n".join(f"{m.group(1).upper()}) {m.group(2).strip()}" for m in options)
    return f"{stem}\n{option_lines}", f"Answer: {letter.group(1).upper()}"


def _split_tfq(text: str) -> tuple[str, str]:
    answers = list(_ANSWER_LINE.finditer(text))
    if not answers:
        raise ParseError("tfq: no 'Answer: True|False' line")
    last = answers[-1]
    truth = _TRUTH.match(last.group(1).strip())
    if not truth:
        raise ParseError(f"tfq: answer {last.group(1)!r} is neither True nor False")
    statement = text[: last.start()].strip()
    q = _Q.match(statement)
    statement = statement[q.end() :].strip() if q else statement
    if not statement:
        raise ParseError("tfq: empty statement")
    return statement, f"Answer: {truth.group(1).capitalize()}"


def _split_cs(text: str) -> tuple[str, str]:
    c = _C.search(text)
    if not c:
        raise ParseError("cs: no 'C:' (category) line")
    s = _S.search(text, c.end())
    if not s:
        raise ParseError("cs: no 'S:' (statement) line after the category")
    category, statement = text[c.end() : s.start()].strip(), text[s.end() :].strip()
    if not category:
        raise ParseError("cs: empty category")
    if not statement:
        raise ParseError("cs: empty statement")
    return category, statement


def _split_para(text: str) -> tuple[str, str]:
    paragraph = " ".join(text.split())
    if not paragraph:
        raise ParseError("para: empty paragraph")
    if _Q.match(text) and _A.search(text):
        raise ParseError("para: expected a paragraph, got a Q/A pair")
    end = _SENTENCE_END.search(paragraph)
    if not end:
        return "", paragraph
    return paragraph[: end.start()].strip(), paragraph[end.end() :].strip()


_SPLITTERS = {"qa": _split_qa, "mcq": _split_mcq, "tfq": _split_tfq, "cs": _split_cs, "para": _split_para}


def split_output(output: str, task_type: str = "qa") -> tuple[str, str]:
    """Split a merged sample into ``(prompt, completion)`` by task type, or raise :class:`ParseError`."""
    return _SPLITTERS[_task(task_type)](output.replace("\r\n", "\n").replace("\r", "\n").strip())


def parse_response(text: str | None, task_type: str = "qa") -> ParsedResponse:
    """Read one raw response. ``error`` is set (and the fields it could not read are None) when the
    response has no usable ``<answer>`` or the answer does not match the task's format."""
    if text is None or not text.strip():
        return ParsedResponse(None, None, None, None, "empty response")
    think, answer = extract_tags(text)
    if answer is None:
        return ParsedResponse(think, None, None, None, "no <answer> tag")
    if not answer:
        return ParsedResponse(think, answer, None, None, "empty <answer>")
    try:
        prompt, completion = split_output(answer, task_type)
    except ParseError as e:
        return ParsedResponse(think, answer, None, None, str(e))
    return ParsedResponse(think, answer, prompt, completion)
