"""Where row-parallel work runs: a small executor protocol, a local and a Ray implementation.

Nothing here knows a stage. A stage hands its executor a batch function (``pa.Table -> pa.Table``,
built once per worker by a factory) and the rows; the executor runs it here or on a cluster and
gives the result batches back. See :mod:`lmmixup_hf.execution.base`.
"""

from lmmixup_hf.execution.base import Executor, LocalExecutor, Part, PoolOptions, Shared

__all__ = ["Executor", "LocalExecutor", "Part", "PoolOptions", "Shared"]
