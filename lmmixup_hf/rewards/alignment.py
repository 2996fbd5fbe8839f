"""Alignment reward: cosine between the answer's and the reference ``output``'s embeddings.

``reference``: 1 if cosine >= 0.8, else 0. ``linear``: the cosine mapped linearly from
``alignment_range`` onto [0, 1] and clipped. None for rows without a reference output; in
``reference`` mode an empty or blank output is a reference output like any other (embedded as given
and scored, as the reference did), otherwise it counts as none.
"""

from __future__ import annotations

import numpy as np

from lmmixup_hf.rewards.base import Reward
from lmmixup_hf.rewards.common import extract_answer, reference_target, reference_text
from lmmixup_hf.rewards.config import RewardConfig, encode


def alignment_from_cosine(cos: np.ndarray, config: RewardConfig) -> np.ndarray:
    mode = config.alignment
    if mode == "reference":
        return (cos >= config.alignment_threshold).astype(np.float64)
    if mode == "linear":
        lo, hi = config.alignment_range
        return np.clip((cos - lo) / (hi - lo), 0.0, 1.0)
    raise ValueError(f"unknown alignment mode {mode!r}; use reference or linear")


def targets(outputs, config: RewardConfig) -> list[str | None]:
    """The reference outputs alignment compares with (None: the reward does not apply)."""
    pick = reference_target if config.targets == "reference" else reference_text
    return [pick(o) for o in outputs]


class AlignmentReward(Reward):
    name = "alignment_reward"

    def score(self, texts, task_types, outputs):
        cfg = self.config
        refs = targets(outputs, cfg)
        rows = [i for i, r in enumerate(refs) if r is not None]
        out: list[float | None] = [None] * len(texts)
        if not rows:
            return out
        answers = [extract_answer(texts[i], cfg.extraction) for i in rows]
        emb = encode(cfg, answers + [refs[i] for i in rows])
        cos = np.einsum("nd,nd->n", emb[: len(rows)], emb[len(rows) :])
        for i, v in zip(rows, alignment_from_cosine(cos, cfg).tolist()):
            out[i] = float(v)
        return out
