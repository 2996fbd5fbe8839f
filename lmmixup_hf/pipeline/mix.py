"""``lmmixup mix``: read the original and distilled rows, mix them (:func:`lmmixup_hf.pipeline.mix.mix_rows`),
and write the mix as TRL prompt-completion (``data/``) and as conversational ``messages`` (``messages/``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from lmmixup_hf.data.io import read_pool
from lmmixup_hf.data.schema import LONG_TAIL, LmmixupError
from lmmixup_hf.execution.base import Executor
from lmmixup_hf.models.registry import DEFAULT_EMBEDDING_MODEL
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.stages.mix import MESSAGES, MixOptions, mix_rows, to_messages

logger = logging.getLogger(__name__)


@dataclass
class MixArgs(MixOptions):
    """The mix options (:class:`~lmmixup_hf.stages.mix.MixOptions`) and the stage's own."""

    original: str = field(kw_only=True, metadata={"help": "Original high-quality rows (pool or stage folder)."})
    distilled: str = field(
        kw_only=True, metadata={"help": "Distilled rows with a `long_tail` column (`lmmixup longtail`)."}
    )
    out: str = field(kw_only=True, metadata={"help": "Output folder: data/ (prompt, completion) and messages/."})
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "Model for dedup."})
    device: str | None = field(
        default=None, metadata={"help": "Embedding device (default: cuda > mps > cpu).", "fingerprint": False}
    )
    batch_size: int = field(
        default=64, metadata={"help": "Embedding batch size.", "range": "[1, inf)", "fingerprint": False}
    )


def mix(args: MixArgs, executor: Executor | None = None) -> Dataset:
    """``lmmixup mix``: read both inputs, run :func:`mix_rows`, write ``data/`` and ``messages/``."""
    from lmmixup_hf.embed.embeddings import get_embedder

    run = StageRun("mix", args.out, inputs=[args.original, args.distilled], params=args)
    if run.is_complete():
        logger.info("mix: up to date, skipping (%s)", args.out)
        return run.load()
    orig = read_pool(args.original, quarantine=run.quarantine)  # a plain pool's long_tail/rating are real columns
    dist = read_pool(args.distilled, quarantine=run.quarantine)
    if LONG_TAIL not in dist.column_names:
        raise LmmixupError(f"{args.distilled}: no `{LONG_TAIL}` column; score it first with `lmmixup longtail`")

    def embed(texts: list[str]) -> np.ndarray:
        return get_embedder(args.embedding_model, device=args.device, batch_size=args.batch_size).encode(texts)

    mixed, stats = mix_rows(
        orig,
        dist,
        total=args.total,
        ratio=args.ratio,
        dedup_threshold=args.dedup_threshold,
        seed=args.seed,
        allow_fewer=args.allow_fewer,
        embed=embed,
    )
    run.finish(
        mixed,
        counts=stats["counts"],
        extra={"requested": {"total": args.total, "ratio": args.ratio}, "shortfall": stats["shortfall"]},
        splits={MESSAGES: to_messages(mixed)},
    )
    c = stats["counts"]
    logger.info("mix: %d rows (%d original + %d distilled)", c["rows"], c["original"], c["distilled"])
    return mixed
