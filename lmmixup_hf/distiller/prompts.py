"""The distiller's prompt: the single source of truth for SFT, GRPO, inference and the pipeline.

Two styles (``prompt_style``):

- ``ours`` (the default): one prompt everywhere, a system message with the output contract and a
  user message ``instruction + blank line + linearised cluster``.
- ``reference``: exactly what a checkpoint trained by the paper's code saw, for running or
  evaluating such a checkpoint. The reference used three prompts: SFT and inference a "data mix-up"
  system prompt with ``instruction + newline + input``; GRPO no system message (the chat
  template's default one then applies) and the same instructions in the user turn, written with
  literal backslash-n escapes; its cluster-to-input step a fixed QA-merge instruction and members
  ``Q: ...\\n A: ...`` joined by the literal characters ``\\n\\n``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from lmmixup_hf.data.schema import TASK_TYPES, normalize_task_type

logger = logging.getLogger(__name__)

PROMPT_VERSION = "1"
PromptStyle = Literal["ours", "reference"]
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)

SYSTEM_PROMPT = (
    "You are an expert at data mix-up: you fuse several related, noisy or partial samples into one "
    "clean, complete and correct sample.\n"
    "Always reply in exactly this format and write nothing outside the two tags:\n"
    "<think>\n"
    "your reasoning: what the samples share, what is wrong or missing, what to keep\n"
    "</think>\n"
    "\n"
    "<answer>\n"
    "the merged sample\n"
    "</answer>"
)

TASK_INSTRUCTIONS: dict[str, str] = {
    "qa": (
        "Merge the related question-answer pairs below into one coherent, accurate question-answer pair that "
        "keeps all of their essential information. Write it as 'Q: <question>' then 'A: <answer>'."
    ),
    "mcq": (
        "Merge the related items below into one well-formed multiple-choice question. Write 'Q: <stem>', then "
        "four options 'A) ...', 'B) ...', 'C) ...', 'D) ...', each on its own line, then 'Answer: <letter>'."
    ),
    "tfq": (
        "Merge the related items below into one clear true/false statement that is supported by them, then a "
        "final line 'Answer: True' or 'Answer: False'."
    ),
    "cs": (
        "Merge the related items below into one category-statement example: 'C: <category>' then "
        "'S: <a complete, accurate statement>'."
    ),
    "para": (
        "Merge the related items below into one coherent, factual paragraph that keeps all of their essential "
        "information."
    ),
}
assert set(TASK_INSTRUCTIONS) == set(TASK_TYPES)

MEMBER_SEPARATOR = "\n\n"  # real blank lines between members

# -- the reference's prompts (facts of its SFT / inference / GRPO / cluster-to-input code) ----------
REFERENCE_SYSTEM_PROMPT = (
    "You are an expert in data mix-up. Your task is to merge the provided content into a single coherent and "
    "high-quality output.\n"
    "You MUST ALWAYS follow this exact format:\n"
    "1. First, provide your reasoning wrapped in <think> tags\n"
    "2. Then, provide your final answer wrapped in <answer> tags\n"
    "NEVER output anything outside these tags.\n\n"
    "Example format:\n"
    "<think>\n[Your step-by-step reasoning about how and why the merge makes sense]\n</think>\n\n"
    "<answer>\n[The final merged content]\n</answer>"
)
# its GRPO user turn: the same text on one line, each newline written as the two characters "\\n"
# (its Jinja template does not turn them into newlines), a space after the first sentence instead
# of a newline, then a literal "\\n" before the content
REFERENCE_GRPO_PREFIX = (
    REFERENCE_SYSTEM_PROMPT.replace("high-quality output.\n", "high-quality output. ").replace("\n", "\\n") + "\\n"
)
REFERENCE_INSTRUCTION = (
    "Given some related question-answer pairs, merge them into a single coherent question-answer pair that "
    "preserves all essential information from the originals."
)
REFERENCE_MEMBER_SEPARATOR = "\\n\\n"  # the README's --sep "\n\n": four characters through the shell


def _check_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt_style {style!r}; expected one of {', '.join(PROMPT_STYLES)}")
    return style


def format_member(prompt: str, completion: str, style: str = "ours") -> str:
    """One cluster member as ``Q: ...`` / ``A: ...`` (line endings normalised, ends stripped); the
    reference puts a space before ``A:``."""
    q = prompt.replace("\r\n", "\n").replace("\r", "\n").strip()
    a = completion.replace("\r\n", "\n").replace("\r", "\n").strip()
    return f"Q: {q}\n A: {a}" if _check_style(style) == "reference" else f"Q: {q}\nA: {a}"


def _member_text(m: Any, style: str) -> str:
    if isinstance(m, str):
        return m.strip()
    if isinstance(m, Mapping):
        return format_member(str(m.get("prompt", "")), str(m.get("completion", "")), style)
    if isinstance(m, Sequence) and len(m) == 2:
        return format_member(str(m[0]), str(m[1]), style)
    raise TypeError(f"a cluster member must be a string, a (prompt, completion) pair or a dict, got {m!r}")


def member_separator(style: str = "ours") -> str:
    return REFERENCE_MEMBER_SEPARATOR if _check_style(style) == "reference" else MEMBER_SEPARATOR


def linearize_cluster(members: Sequence[Any], style: str = "ours") -> str:
    """A cluster as the model sees it: members separated by blank lines (reference: by ``\\n\\n``)."""
    return member_separator(style).join(_member_text(m, style) for m in members)


def instruction_for(task_type: str | None, style: str = "ours") -> str:
    """Our per-task instruction; the reference's one fixed QA-merge instruction for any task."""
    if _check_style(style) == "reference":
        return REFERENCE_INSTRUCTION
    return TASK_INSTRUCTIONS[normalize_task_type(task_type)]


def record_instruction(record: Mapping[str, Any], task_type: str | None, style: str = "ours") -> str:
    """A MIXTURE record's instruction: its own when it has one; without one, ours is the task's
    instruction and the reference's is none (its SFT and inference wrote the input alone)."""
    value = record.get("instruction")
    if isinstance(value, str) and value.strip():
        return value
    return "" if _check_style(style) == "reference" else instruction_for(task_type, style)


def user_content(instruction: str, cluster_text: str, style: str = "ours") -> str:
    """``instruction``, a blank line (reference: one newline), then the cluster; either alone if the
    other is empty."""
    instruction, cluster_text = instruction.strip(), cluster_text.strip()
    if instruction and cluster_text:
        join = "\n" if _check_style(style) == "reference" else "\n\n"
        return f"{instruction}{join}{cluster_text}"
    return instruction or cluster_text


def system_prompt(style: str = "ours") -> str:
    return REFERENCE_SYSTEM_PROMPT if _check_style(style) == "reference" else SYSTEM_PROMPT


def build_messages(
    cluster_text: str, task_type: str | None = "qa", instruction: str | None = None, style: str = "ours"
) -> list[dict]:
    """The chat messages for one cluster (system contract + user instruction and cluster): what SFT,
    inference and (our style) GRPO use."""
    instruction = instruction if instruction is not None else instruction_for(task_type, style)
    return [
        {"role": "system", "content": system_prompt(style)},
        {"role": "user", "content": user_content(instruction, cluster_text, style)},
    ]


def build_grpo_messages(
    cluster_text: str, task_type: str | None = "qa", instruction: str | None = None, style: str = "ours"
) -> list[dict]:
    """The GRPO prompt. Ours: the same messages as SFT. Reference: one user turn, the escaped
    instructions + ``instruction + blank line + input``, each stripped first (its GRPO data merged
    the two that way), either alone if the other is empty."""
    if _check_style(style) != "reference":
        return build_messages(cluster_text, task_type, instruction, style)
    instruction = instruction if instruction is not None else instruction_for(task_type, style)
    content = "\n\n".join(x for x in (instruction.strip(), cluster_text.strip()) if x)
    return [{"role": "user", "content": REFERENCE_GRPO_PREFIX + content}]


def format_target(output: str, cot: str | None = None, style: str = "ours") -> str:
    """The completion the model is trained to write (SFT targets, reference completions). The
    reference writes the think block whenever ``cot`` is a non-empty string (whitespace only gives
    an empty block) and right-strips both parts."""
    if _check_style(style) == "reference":
        head = f"<think>\n{cot.rstrip()}\n</think>\n\n" if isinstance(cot, str) and cot else ""
        return f"{head}<answer>\n{output.rstrip()}\n</answer>"
    think = (cot or "").strip()
    return f"<think>\n{think}\n</think>\n\n<answer>\n{output.strip()}\n</answer>"


def prompt_token_count(tokenizer: Any, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    return len(ids)


def fit_messages(
    tokenizer: Any,
    members: Sequence[Any],
    task_type: str | None = "qa",
    max_prompt_tokens: int = 2400,
    instruction: str | None = None,
    style: str = "ours",
) -> tuple[list[dict] | None, int]:
    """Build the messages for a cluster within ``max_prompt_tokens``, dropping whole members from
    the end when over budget (never cutting the chat template). Returns ``(messages, n_dropped)``;
    messages is None when even one member does not fit."""
    kept = list(members)
    while kept:
        messages = build_messages(linearize_cluster(kept, style), task_type, instruction, style)
        if prompt_token_count(tokenizer, messages) <= max_prompt_tokens:
            dropped = len(members) - len(kept)
            if dropped:
                logger.debug("cluster over budget: dropped %d of %d members", dropped, len(members))
            return messages, dropped
        kept.pop()
    return None, len(members)
