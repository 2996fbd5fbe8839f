"""The judge's rubric prompts: our rubric per kind (Rarity, Complexity, Informativeness, Overall, each
1-10, reference-free by default) and the reference rating script's prompt (``style="reference"``, one
user message, no system turn); see ``docs/rating.md``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmmixup_hf.data.schema import TASK_TYPES

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
