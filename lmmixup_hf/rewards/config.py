"""Reward configuration and the per-process resources it points at.

Rewards are plain callables, so their settings come from a :class:`RewardConfig` (or, for the
module-level functions used by dotted path, from ``LMMIXUP_*`` environment variables). The
embedding model and the libraries are loaded once per process and shared by every reward; the
last batch's embeddings are memoised, so quality and alignment called one after the other on the
same completions encode them once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np

from lmmixup_hf.models.registry import DEFAULT_EMBEDDING_MODEL

logger = logging.getLogger(__name__)

Mode = Literal["reference", "smooth"]
REFERENCE_WEIGHTS = (0.5, 0.4, 0.1)  # quality, alignment, format
# the reference's weights for a task type missing from its task config (anything but the five
# exact ``<task>_mixup`` keys, e.g. None or ``qa``): quality and format only
REFERENCE_FALLBACK_WEIGHTS = (0.8, 0.0, 0.2)

_ENV = {
    "mode": "LMMIXUP_REWARD_MODE",
    "embedding_model": "LMMIXUP_EMBEDDING_MODEL",
    "library": "LMMIXUP_QUALITY_LIBRARY",
    "format_mode": "LMMIXUP_FORMAT_MODE",
    "quality_mode": "LMMIXUP_QUALITY_MODE",
    "alignment_mode": "LMMIXUP_ALIGNMENT_MODE",
    "alignment_threshold": "LMMIXUP_ALIGNMENT_THRESHOLD",
    "weights": "LMMIXUP_REWARD_WEIGHTS",
    "k": "LMMIXUP_QUALITY_K",
    "device": "LMMIXUP_REWARD_DEVICE",
}


@dataclass(frozen=True)
class RewardConfig:
    """``mode`` picks a preset: ``reference`` (the reference scorer, leniencies and hard thresholds
    included) or ``smooth`` (strict format, P(score >= 4) quality, linear alignment, fixed answer
    extraction). The ``*_mode`` fields override single parts of the preset."""

    mode: Mode = "reference"
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    library: str | None = None
    format_mode: str | None = None  # reference | strict
    quality_mode: str | None = None  # reference | mass | linear
    alignment_mode: str | None = None  # reference | linear
    alignment_threshold: float = 0.8
    alignment_range: tuple[float, float] = (0.5, 0.9)  # linear map: lo -> 0, hi -> 1
    weights: tuple[float, float, float] = REFERENCE_WEIGHTS
    k: int = 16
    batch_size: int = 64
    device: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("reference", "smooth"):
            raise ValueError(f"unknown reward mode {self.mode!r}; use reference or smooth")
        if len(self.weights) != 3 or sum(self.weights) <= 0 or min(self.weights) < 0:
            raise ValueError(
                f"reward weights must be three non-negative numbers (quality, alignment, format), got {self.weights}"
            )

    @property
    def format(self) -> str:
        return self.format_mode or ("reference" if self.mode == "reference" else "strict")

    @property
    def quality(self) -> str:
        return self.quality_mode or ("reference" if self.mode == "reference" else "mass")

    @property
    def alignment(self) -> str:
        return self.alignment_mode or ("reference" if self.mode == "reference" else "linear")

    @property
    def extraction(self) -> str:
        return "reference" if self.mode == "reference" else "fixed"

    @property
    def targets(self) -> str:
        """``reference``: an empty or blank reference output is embedded and scored as the
        reference did; ``nonempty``: alignment does not apply to it (None)."""
        return "reference" if self.mode == "reference" else "nonempty"

    def weights_for(self, task_type: Any) -> tuple[float, float, float]:
        """Per-row weights: in ``reference`` mode a task type outside the five ``<task>_mixup``
        keys falls back to (0.8, 0, 0.2) as in the reference; otherwise ``weights``."""
        from lmmixup_hf.rewards.common import reference_task

        if self.mode == "reference" and reference_task(task_type) is None:
            return REFERENCE_FALLBACK_WEIGHTS
        return self.weights

    @classmethod
    def from_env(cls, **overrides: Any) -> RewardConfig:
        values: dict[str, Any] = {}
        for name, var in _ENV.items():
            raw = os.environ.get(var)
            if raw is None or raw == "":
                continue
            if name == "weights":
                values[name] = tuple(float(x) for x in raw.replace(" ", "").split(","))
            elif name == "alignment_threshold":
                values[name] = float(raw)
            elif name == "k":
                values[name] = int(raw)
            else:
                values[name] = raw
        values.update(overrides)
        return cls(**values)

    def with_(self, **changes: Any) -> RewardConfig:
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in changes.items() if k in known})

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces this config for the module-level reward functions."""
        env = {}
        for name, var in _ENV.items():
            value = getattr(self, name)
            if value is None:
                continue
            env[var] = ",".join(str(x) for x in value) if name == "weights" else str(value)
        return env


# -- shared resources ------------------------------------------------------------------------------
_LOCK = threading.Lock()
_LIBRARIES: dict[tuple[str, str], dict] = {}
_MEMO_SIZE = 8192
_MEMO: dict[str, OrderedDict[str, np.ndarray]] = {}


def embedder_for(config: RewardConfig):
    from lmmixup_hf.embed.embeddings import get_embedder

    return get_embedder(
        config.embedding_model, cache=False, show_progress=False, batch_size=config.batch_size, device=config.device
    )


def encode(config: RewardConfig, texts: list[str]) -> np.ndarray:
    """One encode per batch: texts seen in the last few thousand calls come from a memo."""
    if not texts:
        return np.zeros((0, 0), np.float32)
    memo = _MEMO.setdefault(config.embedding_model, OrderedDict())
    with _LOCK:
        missing = list(dict.fromkeys(t for t in texts if t not in memo))
    if missing:
        vecs = embedder_for(config).encode(missing)
        with _LOCK:
            memo.update(zip(missing, vecs))
            while len(memo) > _MEMO_SIZE:
                memo.popitem(last=False)
    with _LOCK:
        return np.stack([memo[t] for t in texts]).astype(np.float32, copy=False)


def libraries_for(config: RewardConfig) -> dict:
    """The task libraries named by ``config.library`` (loaded once; embedding model checked)."""
    if not config.library:
        return {}
    from lmmixup_hf.rewards.library import load_library

    key = (os.path.abspath(config.library), config.embedding_model)
    with _LOCK:
        if key not in _LIBRARIES:
            _LIBRARIES[key] = load_library(config.library, embedding_model=config.embedding_model)
            logger.info("quality library %s: tasks %s", config.library, ", ".join(_LIBRARIES[key]))
        return _LIBRARIES[key]


def clear_caches() -> None:
    with _LOCK:
        _LIBRARIES.clear()
        _MEMO.clear()
