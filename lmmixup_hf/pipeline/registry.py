"""The one list of stages: what `lmmixup run` chains and what `lmmixup <stage>` runs.

Modules are named as strings so that reading the list imports nothing heavy (``lmmixup --help``
stays fast); each stage's command is ``func(args)`` with ``args`` an instance of its dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    args: str  # the arguments dataclass in ``module``
    func: str
    help: str


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        "lmmixup_hf.pipeline.ingest",
        "IngestArgs",
        "ingest",
        "Validate a pool onto the data contract, quarantining bad rows.",
    ),
    Stage(
        "rate",
        "lmmixup_hf.pipeline.rate",
        "RateArgs",
        "rate",
        "Score every row with an LLM judge (any OpenAI-compatible endpoint or a local model).",
    ),
    Stage(
        "curate",
        "lmmixup_hf.pipeline.curate",
        "CurateArgs",
        "curate",
        "Estimate the judge's noise and correct the scores its neighbours contradict (off in `run` by default).",
    ),
    Stage(
        "split",
        "lmmixup_hf.pipeline.split",
        "SplitArgs",
        "split_rated",
        "Split rated rows into high/ and low/ quality.",
    ),
    Stage(
        "cluster",
        "lmmixup_hf.pipeline.cluster",
        "ClusterArgs",
        "cluster",
        "Cluster the low-quality rows, one source at a time.",
    ),
    Stage(
        "distill",
        "lmmixup_hf.pipeline.distill",
        "DistillArgs",
        "distill",
        "Fuse each cluster into one sample with the distiller.",
    ),
    Stage("rerate", "lmmixup_hf.pipeline.rate", "RateArgs", "rate", "Score the distilled rows with the same judge."),
    Stage("filter", "lmmixup_hf.pipeline.split", "FilterArgs", "filter_rated", "Keep rated rows at or above a score."),
    Stage(
        "longtail",
        "lmmixup_hf.pipeline.longtail",
        "LongtailArgs",
        "longtail",
        "Long-tail (kNN rarity) scores against the original high-quality rows.",
    ),
    Stage(
        "mix",
        "lmmixup_hf.pipeline.mix",
        "MixArgs",
        "mix",
        "Original high-quality rows + the rarest distilled rows at a ratio.",
    ),
    Stage("report", "lmmixup_hf.pipeline.report", "ReportArgs", "report", "Write report.html/.md for a run folder."),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
