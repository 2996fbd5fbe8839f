"""Loader and scorer for the ``mixture_distill_<task>`` tasks: a distiller on the MIXTURE test split.

The prompt is the distiller's own (``lmmixup_hf.distiller.prompts``): the system contract goes in
the ``system`` column, which the task uses as its description, so ``--apply_chat_template`` turns
it into the system message. The metrics are the training rewards (``lmmixup_hf.rewards``), so they
follow the same ``LMMIXUP_*`` settings (reward mode, embedding model, quality library):

- ``format``: think/answer shape + the task's answer pattern, always computed;
- ``alignment``: similarity of the answer to the reference ``output``;
- ``quality``: Bayes kNN quality, only when ``LMMIXUP_QUALITY_LIBRARY`` names a library;
- ``judge``: an LLM judge's rating in [0, 1], only when ``LMMIXUP_MIXTURE_JUDGE=1`` (endpoint from
  ``LMMIXUP_JUDGE_MODEL`` / ``LMMIXUP_JUDGE_BASE_URL`` / ``OPENAI_API_KEY``).

A metric that does not apply to an item is None and is left out of its mean (NaN if none applies).

``prompt_style`` (``--metadata '{"prompt_style": "reference"}'`` or ``LMMIXUP_PROMPT_STYLE``) renders
the paper's SFT / inference prompt instead of ours, to evaluate a distiller trained by its code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import datasets

from lmmixup_hf.distiller.prompts import format_target, record_instruction, system_prompt, user_content
from lmmixup_hf.evaluation import metrics

logger = logging.getLogger(__name__)

ENV_DATA = "LMMIXUP_MIXTURE_DATA"
ENV_STYLE = "LMMIXUP_PROMPT_STYLE"
HUB_REPO = "dokiik/MIXTURE"


def test_file(task: str) -> str:
    return f"data_sft/{task}/merged_test_{task}_noisy.json"


def load_mixture(task: str, data_dir: str | None = None, prompt_style: str | None = None, **_) -> datasets.DatasetDict:
    """The MIXTURE test file of one task, from ``data_dir`` / ``$LMMIXUP_MIXTURE_DATA`` or the Hub,
    with the prompt in ``prompt_style`` (``$LMMIXUP_PROMPT_STYLE``, else ours)."""
    style = prompt_style or os.environ.get(ENV_STYLE) or "ours"
    root = data_dir or os.environ.get(ENV_DATA)
    if root:
        path = Path(root).expanduser().resolve() / test_file(task)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no MIXTURE test file for {task} (data_dir / {ENV_DATA} = {root})")
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(HUB_REPO, test_file(task), repo_type="dataset"))
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    rows = []
    for i, rec in enumerate(records):
        for field in ("input", "output"):
            if not isinstance(rec.get(field), str) or not rec[field].strip():
                raise ValueError(f"{path}: item {i}: field {field!r} must be a non-empty string")
        instruction = record_instruction(rec, task, style)
        rows.append(
            {
                "id": str(rec.get("id", i)),
                "task_type": task,
                "system": system_prompt(style),
                "user": user_content(instruction, rec["input"], style),
                "output": rec["output"],
                "target": format_target(rec["output"], rec.get("cot"), style),
            }
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _judge_enabled() -> bool:
    return os.environ.get("LMMIXUP_MIXTURE_JUDGE", "").lower() in ("1", "true", "yes")


def process_results(doc: dict, results: list) -> dict:
    from lmmixup_hf import rewards

    completion = results[0]
    # the GRPO data's task name (``qa_mixup``): reference-mode rewards give task credit to it only
    columns = {"task_type": [f"{doc['task_type']}_mixup"], "output": [doc["output"]]}
    prompt = [doc["user"]]
    scores = {
        "format": rewards.format_reward(prompt, [completion], **columns)[0],
        "alignment": rewards.alignment_reward(prompt, [completion], **columns)[0],
        "quality": None,
        "judge": None,
    }
    if rewards.RewardConfig.from_env().library:
        scores["quality"] = rewards.quality_reward(prompt, [completion], **columns)[0]
    if _judge_enabled():
        scores["judge"] = asyncio.run(rewards.JudgeReward()(prompt, [completion], **columns))[0]
    return scores


def mean_skip_none(items: list) -> float:
    return metrics.mean_skip_none(items)
