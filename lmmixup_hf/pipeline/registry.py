"""The one list of stages: what `lmmixup run` chains, what `lmmixup <stage>` runs, and where each
stage's parallel work goes.

A stage is declared once, here (:class:`Stage`): its command, its inputs (which option reads which
earlier stage's folder), the defaults the pipeline prefers, and its row-parallel parts (each with
its rows per call; ``ray: {<part>: ...}`` sizes its pool). `lmmixup run`'s wiring, the ``ray:``
options and the report's list of folders are all read from this list.

Modules are named as strings so that reading the list imports nothing heavy (``lmmixup --help``
stays fast); each stage's command is ``func(args, executor=...)`` with ``args`` an instance of its
dataclass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lmmixup_hf.execution.base import Part

RUN_INPUT = "$input"  # an input wired to the pipeline config's `input`
RUN_DIR = "$run_dir"  # an input wired to the run folder itself


@dataclass(frozen=True)
class Stage:
    """One stage, declared once.

    ``inputs`` maps an option of ``args`` to what the pipeline wires into it: ``"<stage>"`` (that
    stage's folder), ``"<stage>/<sub>"`` (a split it writes), :data:`RUN_INPUT` or :data:`RUN_DIR`;
    a tuple of them means the first whose stage is on (an opt-in stage, ``defaults={"enabled":
    False}``, may be off).
    A stage with ``folder=True`` writes ``<run>/<name>/`` through its ``out`` option. ``defaults``
    are values the pipeline prefers over the command's own (a config section still overrides them).
    ``parts`` are its row-parallel pieces (see :class:`~lmmixup_hf.execution.base.Part`).
    """

    name: str
    module: str
    args: str  # the arguments dataclass in ``module``
    func: str
    help: str
    inputs: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    parts: tuple[Part, ...] = ()
    folder: bool = True

    def __post_init__(self) -> None:  # read-only, as the rest of the declaration
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def wiring(self, run_dir: str | Path, input_path: str, off: Collection[str] = ()) -> dict[str, str]:
        """The options the pipeline sets itself: where this stage reads and writes (``off``: the
        stages that do not run, so an input falls back to the next one named)."""
        run_dir = Path(run_dir)
        where = {RUN_INPUT: input_path, RUN_DIR: str(run_dir)}

        def source(src: str | tuple[str, ...]) -> str:
            if isinstance(src, tuple):
                src = next(s for s in src if s.split("/")[0] not in off)
            return where.get(src) or str(run_dir / src)

        wired = {opt: source(src) for opt, src in self.inputs.items()}
        return {**wired, "out": str(run_dir / self.name)} if self.folder else wired

    def part(self, name: str) -> Part:
        """One of this stage's parts, by name."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"stage {self.name} declares no part {name!r}")


# In this process a judge keeps `max_concurrency` requests in flight across a whole block and
# reports each rating as it arrives, so the local blocks are large (a block boundary waits for
# its slowest request); on Ray a block is one actor call, which reads its rows and writes its part:
# big enough that an actor keeps its requests in flight and the files stay few, small enough that a
# modest pool still spreads over the actors.
JUDGE_BLOCK = 16384
RAY_JUDGE_BLOCK = 1024
EMBED = Part("embed", 512)  # the embedding done by curate, cluster and longtail: one pool

STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        "lmmixup_hf.pipeline.ingest",
        "IngestArgs",
        "ingest",
        "Validate a pool onto the data contract, quarantining bad rows.",
        inputs={"input": RUN_INPUT},
    ),
    Stage(
        "rate",
        "lmmixup_hf.pipeline.rate",
        "RateArgs",
        "rate",
        "Score every row with an LLM judge (any OpenAI-compatible endpoint or a local model).",
        inputs={"input": "ingest"},
        parts=(Part("rate", RAY_JUDGE_BLOCK, local_batch_size=JUDGE_BLOCK),),
    ),
    Stage(
        "curate",
        "lmmixup_hf.pipeline.curate",
        "CurateArgs",
        "curate",
        "Estimate the judge's noise and correct the scores its neighbours contradict (off in `run` by default).",
        inputs={"input": "rate"},
        defaults={"enabled": False},  # opt-in: `curate: {enabled: true}`
        parts=(EMBED,),
    ),
    Stage(
        "split",
        "lmmixup_hf.pipeline.split",
        "SplitArgs",
        "split_rated",
        "Split rated rows into high/ and low/ quality.",
        inputs={"input": ("curate", "rate")},  # the curated scores when curate is on
    ),
    Stage(
        "cluster",
        "lmmixup_hf.pipeline.cluster",
        "ClusterArgs",
        "cluster",
        "Cluster the low-quality rows, one source at a time.",
        inputs={"input": "split/low"},
        defaults={"quality": "all"},  # its input is already the low split
        parts=(EMBED, Part("cluster", 1)),
    ),
    Stage(
        "distill",
        "lmmixup_hf.pipeline.distill",
        "DistillArgs",
        "distill",
        "Fuse each cluster into one sample with the distiller.",
        inputs={"input": "cluster"},
        parts=(Part("distill", 1),),  # rows are chunks of clusters
    ),
    Stage(
        "rerate",
        "lmmixup_hf.pipeline.rate",
        "RateArgs",
        "rate",
        "Score the distilled rows with the same judge.",
        inputs={"input": "distill"},
        parts=(Part("rerate", RAY_JUDGE_BLOCK, local_batch_size=JUDGE_BLOCK),),
    ),
    Stage(
        "filter",
        "lmmixup_hf.pipeline.split",
        "FilterArgs",
        "filter_rated",
        "Keep rated rows at or above a score.",
        inputs={"input": "rerate"},
    ),
    Stage(
        "longtail",
        "lmmixup_hf.pipeline.longtail",
        "LongtailArgs",
        "longtail",
        "Long-tail (kNN rarity) scores against the original high-quality rows.",
        inputs={"input": "filter", "reference": "split/high"},
        parts=(EMBED, Part("longtail", 2048)),
    ),
    Stage(
        "mix",
        "lmmixup_hf.pipeline.mix",
        "MixArgs",
        "mix",
        "Original high-quality rows + the rarest distilled rows at a ratio.",
        # the originals as the longtail stage scored them (on the distilled rows' scale), ranked by
        # quality then long-tail, as the reference's ori_highqual_longtail file
        inputs={"original": "longtail/reference", "distilled": "longtail"},
    ),
    Stage(
        "report",
        "lmmixup_hf.pipeline.report",
        "ReportArgs",
        "report",
        "Write report.html/.md for a run folder.",
        inputs={"run_dir": RUN_DIR},
        folder=False,
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
FOLDER_STAGES = tuple(s.name for s in STAGES if s.folder)  # the stages that write a folder of their own


def stage(name: str) -> Stage:
    """The declared stage called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages are {', '.join(STAGE_NAMES)}")


def parts(stages: tuple[Stage, ...] = STAGES) -> tuple[Part, ...]:
    """Every declared part once, in stage order (a part shared by stages, like ``embed``, once)."""
    seen: dict[str, Part] = {}
    for s in stages:
        for p in s.parts:
            seen.setdefault(p.name, p)
    return tuple(seen.values())
