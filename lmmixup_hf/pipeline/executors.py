"""Which executor a run uses, and the ``ray:`` options: the glue between the stage registry and the
generic executors of :mod:`lmmixup_hf.execution`.

A stage command keeps its files, checkpoints and manifest; what it hands its executor is a batch
function of its own and the rows (see :mod:`lmmixup_hf.execution.base`), or, for rate, rerate and
distill out of this process, blocks of its parquet input that the workers read, process and write
themselves (:mod:`lmmixup_hf.execution.blocks`). The local executor runs the functions here, as
the commands always have; the Ray executor runs them on Ray Data. Either way a rerun after a kill
picks up where the checkpoints or completion records stopped, and the results are the same rows.

>>> executor: ray            # in a pipeline config
>>> ray:
>>>   address: auto          # a running cluster (`ray start --head`); leave out for a private one
>>>   rate: {actors: 8}
>>>   distill: {actors: 2, num_gpus: 1}

The ``ray:`` section has one pool per part that a stage declares (:data:`RAY_PARTS`, read from
:mod:`lmmixup_hf.pipeline.registry`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field, make_dataclass
from typing import Any

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.execution.base import Executor, LocalExecutor, PoolOptions
from lmmixup_hf.execution.ray import RayClusterOptions
from lmmixup_hf.options import from_mapping
from lmmixup_hf.pipeline.registry import parts

EXECUTORS = ("local", "ray")

# the parts that have a pool of their own (`ray: {<part>: {...}}`) and their rows per call
RAY_PARTS = tuple(p.name for p in parts())
DEFAULT_BATCH = {p.name: p.batch_size for p in parts()}
RayPoolOptions = PoolOptions  # the name the ``ray:`` docs use


def _from_config(cls: type, raw: Mapping[str, Any] | None, where: str = "ray") -> Any:
    """A ``ray:`` mapping, checked like every options section (errors name ``where.key``)."""
    return from_mapping(cls, dict(raw or {}), f"{where}.")


# The ``ray:`` section of a pipeline config: the cluster, then one pool per declared part.
RayOptions = make_dataclass(
    "RayOptions",
    [(name, PoolOptions, field(default_factory=PoolOptions)) for name in RAY_PARTS],
    bases=(RayClusterOptions,),
    namespace={"from_config": classmethod(_from_config), "__module__": __name__},
)
RayOptions.__doc__ = "The ``ray:`` section of a pipeline config: the cluster, then one pool per part (RAY_PARTS)."


def make_executor(name: str = "local", ray: Mapping[str, Any] | RayClusterOptions | None = None) -> Executor:
    """``local`` (the default, needs nothing) or ``ray`` (needs ``pip install "lmmixup-hf[ray]"``)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from lmmixup_hf.execution.ray import RayExecutor

        options = ray if isinstance(ray, RayClusterOptions) else RayOptions.from_config(ray)
        return RayExecutor(options)
    raise LmmixupError(f"executor: {name!r}: expected one of {', '.join(EXECUTORS)}")


__all__ = ["DEFAULT_BATCH", "EXECUTORS", "RAY_PARTS", "Executor", "LocalExecutor", "RayOptions", "make_executor"]
