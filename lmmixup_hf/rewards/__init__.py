"""TRL reward functions for the LM-mixup distiller.

Each reward is a picklable callable ``f(prompts, completions, **columns) -> list[float | None]``
reading ``task_type`` and ``output`` from the dataset columns. Use the module-level functions by
dotted path (``lmmixup_hf.rewards.format_reward``; configured by ``LMMIXUP_*`` environment
variables, see :class:`RewardConfig`), or build configured instances::

    cfg = RewardConfig(mode="smooth", library="runs/x/library", embedding_model="BAAI/bge-m3")
    reward_funcs = [QualityReward(cfg), AlignmentReward(cfg), FormatReward(cfg)]
"""

from __future__ import annotations

from typing import Any

from lmmixup_hf.rewards.alignment import AlignmentReward
from lmmixup_hf.rewards.base import Reward
from lmmixup_hf.rewards.config import RewardConfig
from lmmixup_hf.rewards.format import FormatReward, format_score
from lmmixup_hf.rewards.mixup import MixupReward
from lmmixup_hf.rewards.quality import QualityReward


def format_reward(prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float | None]:
    """0.5 for the think/answer shape + 0.5 for the task pattern (``LMMIXUP_FORMAT_MODE``)."""
    return FormatReward(RewardConfig.from_env())(prompts, completions, **kwargs)


def alignment_reward(prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float | None]:
    """Cosine of answer vs. reference ``output`` (None without a reference)."""
    return AlignmentReward(RewardConfig.from_env())(prompts, completions, **kwargs)


def quality_reward(prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float | None]:
    """Bayes kNN quality over ``LMMIXUP_QUALITY_LIBRARY``."""
    return QualityReward(RewardConfig.from_env())(prompts, completions, **kwargs)


def mixup_reward(prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float | None]:
    """0.5·quality + 0.4·alignment + 0.1·format (``LMMIXUP_REWARD_WEIGHTS``), one encode per batch."""
    return MixupReward(RewardConfig.from_env())(prompts, completions, **kwargs)


__all__ = [
    "AlignmentReward",
    "FormatReward",
    "MixupReward",
    "QualityReward",
    "Reward",
    "RewardConfig",
    "alignment_reward",
    "format_reward",
    "format_score",
    "mixup_reward",
    "quality_reward",
]


def __getattr__(name: str) -> Any:
    """``judge_reward`` (an LLM-judge reward) lives in an optional module, imported on first use."""
    if name in ("llm_judge", "judge_reward", "JudgeReward"):
        import importlib

        try:
            module = importlib.import_module(f"{__name__}.llm_judge")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.llm_judge":
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
            raise
        return module if name == "llm_judge" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
