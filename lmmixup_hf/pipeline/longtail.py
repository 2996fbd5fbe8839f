"""``lmmixup longtail``: long-tail (kNN rarity) scores of the distilled rows against the original high-quality
rows, on one joint scale. Embeds each set once (or reuses ``embedding`` columns); the scoring is
:func:`lmmixup_hf.stages.longtail.longtail_rows`; the manifest records each kNN search and, for
ANN backends, its measured recall."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset

from lmmixup_hf.data.io import read_pool, read_stage_data
from lmmixup_hf.data.schema import LONG_TAIL, LmmixupError
from lmmixup_hf.execution.base import Executor, LocalExecutor
from lmmixup_hf.models.registry import DEFAULT_EMBEDDING_MODEL
from lmmixup_hf.pipeline.registry import stage
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.stages.longtail import LONG_TAIL_RAW, REFERENCE_SPLIT, LongtailOptions, knn_on, longtail_rows

logger = logging.getLogger(__name__)


@dataclass
class LongtailArgs(LongtailOptions):
    """The long-tail options (:class:`~lmmixup_hf.stages.longtail.LongtailOptions`) and the stage's own."""

    input: str = field(
        kw_only=True, metadata={"help": "Rows to score (pool or stage folder), e.g. the distilled rows."}
    )
    out: str = field(kw_only=True, metadata={"help": "Output folder: data/ (+ reference/ with --reference)."})
    reference: str | None = field(
        default=None, metadata={"help": "Score the input against this set (e.g. the original high-quality rows)."}
    )
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "Sentence-transformers model."})
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device for the embedding model (default: cuda > mps > cpu) and exact kNN (cuda > cpu).",
            "fingerprint": False,
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "Embedding batch size.", "range": "[1, inf)", "fingerprint": False}
    )


def longtail(args: LongtailArgs, executor: Executor | None = None) -> Dataset:
    """``lmmixup longtail``: read both sets, embed them once (or reuse ``embedding`` columns), run
    :func:`~lmmixup_hf.stages.longtail.longtail_rows`, write ``data/`` and ``reference/``.
    ``executor`` runs the embedding and the exact kNN searches (default: here)."""
    from lmmixup_hf.embed.embeddings import embedder_on, row_embeddings, with_embeddings

    inputs = [args.input] + ([args.reference] if args.reference else [])
    run = StageRun("longtail", args.out, inputs=inputs, params=args)
    if run.is_complete():
        logger.info("longtail: up to date, skipping (%s)", args.out)
        return run.load()
    if _n_rows(args.input) == 0:
        return _nothing_to_score(run, args)
    ds = read_pool(args.input, quarantine=run.quarantine)
    ref = read_pool(args.reference, quarantine=run.quarantine) if args.reference else None
    executor, declared = executor or LocalExecutor(), stage("longtail")
    embed = dict(model_id=args.embedding_model, device=args.device, batch_size=args.batch_size)
    embed["embedder"] = embedder_on(
        executor, declared.part("embed"), args.embedding_model, device=args.device, batch_size=args.batch_size
    )
    x = row_embeddings(ds, **embed)
    y = row_embeddings(ref, **embed) if ref is not None else None
    if y is not None and y.shape[1] != x.shape[1]:
        raise LmmixupError(f"{args.input} embeddings are {x.shape[1]}-d but {args.reference}'s are {y.shape[1]}-d")
    out, ref_out, checks = longtail_rows(
        ds,
        x,
        ref,
        y,
        k=args.k,
        normalize=args.normalize,
        backend=args.backend,
        device=args.device,
        search=knn_on(executor, declared.part("longtail")),
    )
    # the vectors travel with the rows, so the mix (and anyone after) never encodes these texts again
    out = with_embeddings(out, x)
    ref_out = with_embeddings(ref_out, y) if ref_out is not None else None
    raw = np.asarray(out[LONG_TAIL_RAW], dtype=np.float64)
    run.finish(
        out,
        counts={"rows": len(out), "reference_rows": len(ref) if ref is not None else 0},
        extra={
            "long_tail": {"k": args.k, "raw_min": float(raw.min()), "raw_max": float(raw.max())},
            "knn": checks,
            "executor": executor.name,
        },
        splits={REFERENCE_SPLIT: ref_out} if ref_out is not None else {},
    )
    logger.info("longtail: scored %d rows (k=%d, %s)", len(out), args.k, args.normalize)
    return out


def _n_rows(stage_dir: str) -> int | None:
    """Rows in a stage folder's data (None: not a stage folder)."""
    import pyarrow.parquet as pq

    files = sorted((Path(stage_dir) / "data").glob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files) if files else None


def _nothing_to_score(run: StageRun, args: LongtailArgs) -> Dataset:
    """A weak distiller or a strict filter can leave nothing to score. k-NN over no rows has no
    answer, so the stage writes its (empty) output unscored, and the mix goes on with the original
    rows only."""
    from datasets import Value

    def unscored(ds: Dataset) -> Dataset:
        nan = [float("nan")] * len(ds)
        for col in (LONG_TAIL_RAW, LONG_TAIL):
            ds = ds.remove_columns([col]) if col in ds.column_names else ds
            ds = ds.add_column(col, nan, feature=Value("float64"))
        return ds

    reference = unscored(read_pool(args.reference, quarantine=run.quarantine)) if args.reference else None
    out = unscored(read_stage_data(args.input))
    run.finish(
        out,
        counts={"rows": 0, "reference_rows": len(reference) if reference is not None else 0},
        extra={"skipped": "no input rows: nothing to score"},
        splits={REFERENCE_SPLIT: reference} if reference is not None else {},
    )
    logger.warning("longtail: no rows reached this stage; nothing to score (a mix will hold original rows only)")
    return out
