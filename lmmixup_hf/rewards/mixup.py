"""The combined reward ``w_q·quality + w_a·alignment + w_f·format`` (reference weights 0.5/0.4/0.1).

Answers and reference outputs are encoded together, once per batch, and the same embeddings feed
both quality and alignment. A component that does not apply to a row (no reference output, no
library for the task) is left out and the remaining weights are renormalised; a row where nothing
applies gives None. In ``reference`` mode a row whose task type is not one of the five
``<task>_mixup`` keys is weighted 0.8/0/0.2, as the reference weighted task types missing from its
task config.
"""

from __future__ import annotations

import numpy as np

from lmmixup_hf.rewards.alignment import alignment_from_cosine, targets
from lmmixup_hf.rewards.base import Reward
from lmmixup_hf.rewards.common import extract_answer
from lmmixup_hf.rewards.config import encode, libraries_for
from lmmixup_hf.rewards.format import format_score
from lmmixup_hf.rewards.quality import quality_scores


def combine(
    components: list[list[float | None]], weights: tuple[float, ...] | list[tuple[float, ...]]
) -> list[float | None]:
    """Weighted sum per row over the components that are not None, weights renormalised.
    ``weights`` is one tuple for every row or one tuple per row."""
    rows = list(zip(*components))
    per_row = weights if weights and isinstance(weights[0], tuple | list) else [weights] * len(rows)
    out: list[float | None] = []
    for values, row_weights in zip(rows, per_row, strict=True):
        pairs = [(w, v) for w, v in zip(row_weights, values) if v is not None and w > 0]
        total = sum(w for w, _ in pairs)
        out.append(sum(w * v for w, v in pairs) / total if total > 0 else None)
    return out


class MixupReward(Reward):
    name = "mixup_reward"

    def components(self, texts, task_types, outputs) -> dict[str, list[float | None]]:
        cfg = self.config
        n = len(texts)
        answers = [extract_answer(t, cfg.extraction) for t in texts]
        refs = targets(outputs, cfg)
        aligned = [i for i, r in enumerate(refs) if r is not None]
        libs = libraries_for(cfg)
        need_answers = bool(libs) or bool(aligned)
        emb = encode(cfg, answers + [refs[i] for i in aligned]) if need_answers else None

        quality: list[float | None] = [None] * n
        if libs:
            quality = quality_scores(emb[:n], task_types, libs, cfg.quality, cfg.k)
        alignment: list[float | None] = [None] * n
        if aligned:
            cos = np.einsum("nd,nd->n", emb[aligned], emb[n:])
            for i, v in zip(aligned, alignment_from_cosine(cos, cfg).tolist()):
                alignment[i] = float(v)
        fmt = [format_score(t, task, cfg.format) for t, task in zip(texts, task_types)]
        return {"quality": quality, "alignment": alignment, "format": fmt}

    def score(self, texts, task_types, outputs):
        c = self.components(texts, task_types, outputs)
        weights = [self.config.weights_for(t) for t in task_types]
        return combine([c["quality"], c["alignment"], c["format"]], weights)
