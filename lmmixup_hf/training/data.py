"""MIXTURE records -> the row formats TRL's SFTTrainer and GRPOTrainer train on.

Both formats use the distiller prompt of :mod:`lmmixup_hf.distiller.prompts` (conversational:
system contract + user instruction and cluster), so SFT, GRPO and inference see the same text.
``prompt_style="reference"`` renders the paper's prompts instead (its SFT system prompt and
``instruction + newline + input``; its GRPO single user turn), to continue training or compare
with a checkpoint trained by its code.

- SFT rows: ``prompt`` (messages) + ``completion`` (``<think>cot</think><answer>output</answer>``
  as one assistant message; the chat template closes it with the end-of-turn token, which is
  supervised, while the prompt is masked by TRL's completion-only loss).
- GRPO rows: ``prompt`` (messages) + ``output`` (the reference) + ``task_type``, the columns the
  rewards read.

GRPO has no prompt-length cap, so :func:`cap_prompts` drops whole cluster members from the end (or
drops the row) for prompts over a token budget, and logs how many.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, load_dataset

from lmmixup_hf.data.schema import DEFAULT_TASK_TYPE, LmmixupError, normalize_task_type
from lmmixup_hf.distiller.prompts import (
    MEMBER_SEPARATOR,
    build_grpo_messages,
    build_messages,
    format_target,
    prompt_token_count,
    record_instruction,
)

logger = logging.getLogger(__name__)

Overlong = Literal["truncate", "drop"]
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def record_task(record: Mapping[str, Any], default: str | None = None) -> str:
    """``task_type`` (``qa_mixup`` style accepted), else the MIXTURE folder tag in ``source``."""
    for key in ("task_type", "source"):
        value = record.get(key)
        if value:
            try:
                return normalize_task_type(value)
            except ValueError:
                continue
    return normalize_task_type(default or DEFAULT_TASK_TYPE)


def _own_instruction(record: Mapping[str, Any]) -> str:
    """The record's own instruction, else none: GRPO records carry it inside ``input`` already."""
    value = record.get("instruction")
    return value if isinstance(value, str) and value.strip() else ""


def sft_example(record: Mapping[str, Any], task_type: str | None = None, style: str = "ours") -> dict[str, Any]:
    task = record_task(record, task_type)
    prompt = build_messages(str(record.get("input") or ""), task, record_instruction(record, task, style), style)
    target = format_target(str(record.get("output") or ""), record.get("cot"), style)
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": target}], "task_type": task}


def grpo_example(record: Mapping[str, Any], task_type: str | None = None, style: str = "ours") -> dict[str, Any]:
    task = record_task(record, task_type)
    prompt = build_grpo_messages(str(record.get("input") or ""), task, _own_instruction(record), style)
    return {"prompt": prompt, "output": str(record.get("output") or ""), "task_type": f"{task}_mixup"}


def _convert(ds: Dataset, fn, task_type: str | None, what: str, style: str = "ours") -> Dataset:
    missing = {"input", "output"} - set(ds.column_names)
    if missing:
        raise LmmixupError(f"{what} data needs columns input and output; missing {', '.join(sorted(missing))}")
    empty = ds.filter(lambda r: not (r["output"] or "").strip(), desc="empty outputs")
    if len(empty):
        logger.warning("%s: dropping %d rows with an empty output", what, len(empty))
        ds = ds.filter(lambda r: bool((r["output"] or "").strip()))
    return ds.map(lambda r: fn(r, task_type, style), remove_columns=ds.column_names, desc=f"{what} rows")


def to_sft_dataset(ds: Dataset, task_type: str | None = None, prompt_style: str = "ours") -> Dataset:
    return _convert(ds, sft_example, task_type, "SFT", prompt_style)


def to_grpo_dataset(ds: Dataset, task_type: str | None = None, prompt_style: str = "ours") -> Dataset:
    return _convert(ds, grpo_example, task_type, "GRPO", prompt_style)


def cap_prompts(
    ds: Dataset, tokenizer: Any, max_prompt_tokens: int | None, overlong: Overlong = "truncate"
) -> Dataset:
    """Keep every prompt within ``max_prompt_tokens`` (chat template included): ``truncate`` drops
    whole cluster members from the end, ``drop`` (or a prompt whose first member alone is too
    long) removes the row. Logs the counts."""
    if not max_prompt_tokens:
        return ds
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be truncate or drop, got {overlong!r}")

    def fit(row: dict) -> dict:
        messages = row["prompt"]
        if prompt_token_count(tokenizer, messages) <= max_prompt_tokens:
            return {"prompt": messages, "_cap": 0}
        if overlong == "drop":
            return {"prompt": messages, "_cap": 2}
        *before, user = messages
        head, *members = user["content"].split(MEMBER_SEPARATOR)  # the head (instruction) always stays
        while members:
            members.pop()
            kept = [*before, {**user, "content": MEMBER_SEPARATOR.join([head, *members])}]
            if prompt_token_count(tokenizer, kept) <= max_prompt_tokens:
                return {"prompt": kept, "_cap": 1}
        return {"prompt": messages, "_cap": 2}

    ds = ds.map(fit, desc="prompt token cap")
    n_trunc = sum(1 for c in ds["_cap"] if c == 1)
    n_drop = sum(1 for c in ds["_cap"] if c == 2)
    if n_trunc or n_drop:
        logger.warning(
            "prompt cap %d tokens: %d prompts truncated (members dropped), %d rows dropped, of %d",
            max_prompt_tokens,
            n_trunc,
            n_drop,
            len(ds),
        )
    else:
        logger.info("prompt cap %d tokens: all %d prompts fit", max_prompt_tokens, len(ds))
    return ds.filter(lambda c: c != 2, input_columns="_cap").remove_columns("_cap")


def load_records(
    name_or_path: str, config: str | None = None, data_dir: str | None = None, split: str = "train"
) -> Dataset:
    """A local ``.json`` / ``.jsonl`` / ``.parquet`` file of MIXTURE records, or a dataset by name
    (``load_dataset("mixture", config, data_dir=...)`` once ``lmmixup_hf`` registered it)."""
    path = Path(name_or_path)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise LmmixupError(f"{path}: expected a .json, .jsonl or .parquet file")
        return load_dataset(builder, data_files=str(path), split="train")
    import lmmixup_hf  # noqa: F401  (registers the ``mixture`` builder)

    return load_dataset(name_or_path, config, data_dir=data_dir, split=split)
