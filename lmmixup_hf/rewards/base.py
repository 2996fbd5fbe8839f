"""The reward callable: TRL's ``f(prompts, completions, **columns) -> list[float | None]``.

Instances are picklable (they hold only their :class:`RewardConfig`) and carry a ``__name__``, which
TRL uses to log ``rewards/<name>/mean``.
"""

from __future__ import annotations

from typing import Any

from lmmixup_hf.rewards.common import column, completion_text
from lmmixup_hf.rewards.config import RewardConfig


class Reward:
    name = "reward"

    def __init__(self, config: RewardConfig | None = None, name: str | None = None, **overrides: Any):
        config = config if config is not None else RewardConfig.from_env()
        self.config = config.with_(**overrides) if overrides else config
        self.__name__ = name or self.name

    def __call__(self, prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float | None]:
        texts = [completion_text(c) for c in (completions or [])]
        n = len(texts)
        return self.score(texts, column(kwargs, "task_type", n), column(kwargs, "output", n))

    def score(self, texts: list[str], task_types: list[Any], outputs: list[Any]) -> list[float | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r}, config={self.config!r})"
