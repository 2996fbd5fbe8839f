"""Value ranges of the stages' options, checked before any work starts.

A ``mix.ratio: 7`` or ``--limit -3`` should fail in the first second, not hours into a run. Options
mean the same thing in every stage that has them, so one table keyed by option name covers all of
the arguments dataclasses (CLI flags and ``lmmixup run`` config sections alike).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

from lmmixup_hf.data.schema import LmmixupError


class Bound(NamedTuple):
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the low end itself is not allowed

    def holds(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return self.high is None or v <= self.high

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


_POSITIVE = Bound(1)
_NON_NEGATIVE = Bound(0)
_SHARE = Bound(0, 1)
_GT_ZERO = Bound(0, None, low_open=True)

BOUNDS: dict[str, Bound] = {
    **dict.fromkeys(
        (
            "batch_size",
            "cell_size",
            "checkpoint_every",
            "data_parallel_size",
            "tensor_parallel_size",
            "k",
            "k_t",
            "limit",
            "max_chars",
            "max_concurrency",
            "max_model_len",
            "max_new_tokens",
            "max_prompt_tokens",
            "max_size",
            "max_tokens",
            "min_size",
            "n_candidates",
            "rounds",
            "sample_size",
            "steps",
            "total",
        ),
        _POSITIVE,
    ),
    **dict.fromkeys(
        (
            "balance_iters",
            "kmeans_iters",
            "refine_rounds",
            "max_retries",
            "retry_base_delay",
            "seed",
            "examples",
            "think_tokens",
            "std_cap",
            "temperature",
        ),
        _NON_NEGATIVE,
    ),
    **dict.fromkeys(("ratio", "top_share", "dedup_threshold", "min_confidence"), _SHARE),
    **dict.fromkeys(("rpm", "tpm", "timeout", "repetition_penalty", "mean_cap", "lr"), _GT_ZERO),
    "gpu_memory_utilization": Bound(0, 1, low_open=True),
    "top_p": Bound(0, 1, low_open=True),
    "sim_floor": Bound(-1, 1),
    "threshold": Bound(0, 5),
    "min_score": Bound(0, 5),
}

# (smaller, larger): the first may not exceed the second
ORDERED: tuple[tuple[str, str], ...] = (("min_size", "max_size"),)


def check_options(args: Any, where: str | None = None) -> Any:
    """Raise one clear error for the first option out of its range; return ``args``.

    ``where`` prefixes config keys (``"demo.yaml: mix"`` gives ``demo.yaml: mix.ratio: ...``);
    without it the error names the flag (``--ratio``)."""

    def name(key: str) -> str:
        return f"{where}.{key}" if where else f"--{key}"

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    for key, value in values.items():
        bound = BOUNDS.get(key)
        if bound is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isnan(value) or not bound.holds(value):
            raise LmmixupError(f"{name(key)} {value!r}: expected a value {bound.describe()}")
    for small, large in ORDERED:
        a, b = values.get(small), values.get(large)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
            raise LmmixupError(f"{name(small)} {a!r} is larger than {name(large)} {b!r}")
    return args
