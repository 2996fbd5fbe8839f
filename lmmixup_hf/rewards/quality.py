"""Quality reward: the posterior over library scores given the answer's k nearest library items.

``reference``: 1 if E[score] >= 4, else 0 (the reference's ``E == 3 -> 0.3`` float-equality branch
is kept for fidelity; it practically never fires). ``mass``: the posterior mass P(score >= 4).
``linear``: clip((E - 2) / 3, 0, 1). A task without a library gives 0.5 in reference mode (as the
reference did) and None otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmmixup_hf.data.schema import HIGH_QUALITY_THRESHOLD
from lmmixup_hf.rewards.base import Reward
from lmmixup_hf.rewards.common import extract_answer, reference_task, task_of
from lmmixup_hf.rewards.config import encode, libraries_for
from lmmixup_hf.rewards.library import TaskLibrary

logger = logging.getLogger(__name__)

REFERENCE_MISSING_LIBRARY = 0.5


def quality_from_posterior(post: np.ndarray, lib: TaskLibrary, mode: str) -> np.ndarray:
    if mode == "mass":
        return lib.mass_at_least(post, HIGH_QUALITY_THRESHOLD)
    expected = lib.expected_score(post)
    if mode == "reference":
        return np.where(expected >= HIGH_QUALITY_THRESHOLD, 1.0, np.where(expected == 3, 0.3, 0.0))
    if mode == "linear":
        return np.clip((expected - 2.0) / 3.0, 0.0, 1.0)
    raise ValueError(f"unknown quality mode {mode!r}; use reference, mass or linear")


def library_key(task_type: Any, mode: str) -> str | None:
    """Which library scores a row. ``reference``: an exact ``<task>_mixup`` key picks its task's
    library and any other name (``mcq``, None, ...) the ``qa`` library, as the reference did;
    otherwise the lenient task name, None when unknown."""
    if mode == "reference":
        return reference_task(task_type) or "qa"
    return task_of(task_type)


def quality_scores(
    embeddings: np.ndarray,
    task_types: Sequence[Any],
    libraries: Mapping[str, TaskLibrary],
    mode: str = "reference",
    k: int = 16,
) -> list[float | None]:
    """Vectorised per task group: one kNN + one matrix posterior per library."""
    keys = [library_key(t, mode) for t in task_types]
    out: list[float | None] = [None] * len(keys)
    for task in {k_ for k_ in keys if k_ is not None}:
        rows = np.array([i for i, key in enumerate(keys) if key == task])
        lib = libraries.get(task)
        if lib is None:
            for i in rows:
                out[i] = REFERENCE_MISSING_LIBRARY if mode == "reference" else None
            continue
        values = quality_from_posterior(lib.posterior(embeddings[rows], k), lib, mode)
        for i, v in zip(rows.tolist(), values.tolist()):
            out[i] = float(v)
    return out


class QualityReward(Reward):
    name = "quality_reward"

    def score(self, texts, task_types, outputs):
        cfg = self.config
        libs = libraries_for(cfg)
        if not libs:
            logger.warning("quality_reward: no quality library configured (LMMIXUP_QUALITY_LIBRARY); returning None")
            return [None] * len(texts)
        answers = [extract_answer(t, cfg.extraction) for t in texts]
        return quality_scores(encode(cfg, answers), task_types, libs, cfg.quality, cfg.k)
