"""``lmmixup curate``: measure how noisy the judge is and correct the scores its neighbourhood contradicts.

Between ``rate`` and ``split`` (in ``lmmixup run`` only with ``curate: {enabled: true}``). Embeds
the rated rows once (or reuses their ``embedding`` column), estimates the judge's score transition
matrix and corrects scores by neighbour voting (:mod:`lmmixup_hf.stages.curate`). Outputs under
``--out``: ``data/`` (every input row: ``rating.score`` curated, ``rating.raw_score`` the judge's,
``score_error`` the probability that the judge's score is wrong, and the ``embedding``),
``diagnosis.json`` (T, the priors, flagged and changed counts), ``summary.png`` and the manifest.
Later stages need no change: they read ``rating.score``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset

from lmmixup_hf.data.io import read_pool, write_json
from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.execution.base import Executor, LocalExecutor
from lmmixup_hf.models.registry import DEFAULT_EMBEDDING_MODEL
from lmmixup_hf.options import Options
from lmmixup_hf.pipeline.registry import stage
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.plotting import figure
from lmmixup_hf.stages.curate import (
    DEFAULT_K,
    DEFAULT_LR,
    DEFAULT_ROUNDS,
    DEFAULT_SAMPLE,
    DEFAULT_STEPS,
    Curation,
    K,
    curate_rows,
)

logger = logging.getLogger(__name__)

DIAGNOSIS = "diagnosis.json"


@dataclass
class CurateArgs(Options):
    """``lmmixup curate``'s options; operational ones (``"fingerprint": False``) never invalidate finished work."""

    input: str = field(metadata={"help": "Rated rows (a rated stage folder or pool with a `rating` struct)."})
    out: str = field(metadata={"help": "Output folder: data/, diagnosis.json, summary.png."})
    enabled: bool = field(
        default=True,
        metadata={
            "help": "In `lmmixup run` the stage is off unless its section says `enabled: true`.",
            "fingerprint": False,
        },
    )
    k: int = field(
        default=DEFAULT_K, metadata={"help": "Neighbours whose scores vote on each row's score.", "range": "[1, inf)"}
    )
    rounds: int = field(
        default=DEFAULT_ROUNDS, metadata={"help": "HOC: sampled rounds of 2-NN consensus.", "range": "[1, inf)"}
    )
    sample_size: int = field(
        default=DEFAULT_SAMPLE, metadata={"help": "HOC: rows per round (at most 90%).", "range": "[1, inf)"}
    )
    steps: int = field(
        default=DEFAULT_STEPS,
        metadata={"help": "HOC: gradient steps solving for T and the prior.", "range": "[1, inf)"},
    )
    lr: float = field(default=DEFAULT_LR, metadata={"help": "HOC: Adam learning rate.", "range": "(0, inf)"})
    min_confidence: float = field(
        default=0.5,
        metadata={"help": "Change a score only when the corrected one is at least this likely.", "range": "[0, 1]"},
    )
    backend: Literal["exact", "partition", "ivf", "hnsw", "auto"] = field(
        default="auto",
        metadata={
            "help": "kNN: exact; partition, ivf or hnsw (self-checked ANN); auto (ANN from 50k rows where it is faster "
            "and meets its recall target)."
        },
    )
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "Sentence-transformers model."})
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device for embedding, kNN and HOC (default: cuda when available, else cpu).",
            "fingerprint": False,
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "Embedding batch size.", "range": "[1, inf)", "fingerprint": False}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the HOC sampling and initialisation.", "range": "[0, inf)"}
    )


def curate(args: CurateArgs, executor: Executor | None = None) -> Dataset | None:
    """``lmmixup curate``: read, embed (or reuse ``embedding``), curate, write data/ + diagnosis + plot."""
    from lmmixup_hf.embed.embeddings import embedder_on, row_embeddings, with_embeddings

    if not args.enabled:
        logger.info("curate: off (enable it with `curate: {enabled: true}`)")
        return None
    run = StageRun("curate", args.out, inputs=[args.input], params=args)
    if run.is_complete():
        logger.info("curate: up to date, skipping (%s)", args.out)
        return run.load()
    ds = read_pool(args.input, quarantine=run.quarantine)
    executor = executor or LocalExecutor()
    embed = stage("curate").part("embed")
    embedder = embedder_on(executor, embed, args.embedding_model, device=args.device, batch_size=args.batch_size)
    x = row_embeddings(ds, args.embedding_model, device=args.device, batch_size=args.batch_size, embedder=embedder)
    try:
        out, result = curate_rows(
            ds,
            x,
            k=args.k,
            rounds=args.rounds,
            sample_size=args.sample_size,
            steps=args.steps,
            lr=args.lr,
            min_confidence=args.min_confidence,
            seed=args.seed,
            backend=args.backend,
            device=args.device,
        )
    except ValueError as e:
        raise LmmixupError(f"{args.input}: {e}") from None
    out = with_embeddings(out, x)  # the vectors travel with the rows: clustering never encodes them again
    diagnosis = result.diagnosis()
    write_json(Path(args.out) / DIAGNOSIS, diagnosis)
    plot_summary(Path(args.out) / "summary.png", result)
    keys = ("rows", "scored", "unscored", "flagged", "changed")
    run.finish(out, counts={k: diagnosis[k] for k in keys}, extra={"curation": _brief(diagnosis)})
    logger.info(
        "curate: %d rows, %d flagged, %d changed, %d without a score passed through; T diagonal %s",
        *(diagnosis[k] for k in ("rows", "flagged", "changed", "unscored")),
        " ".join(f"{v:.2f}" for v in np.diag(result.T)),
    )
    return out


def _brief(diagnosis: dict[str, Any]) -> dict[str, Any]:
    return {k: diagnosis[k] for k in ("T", "p_clean", "p_rated", "hoc_loss", "knn")}


def plot_summary(path: Path, result: Curation) -> None:
    """The T heatmap (rows: true score, columns: the judge's) and the histograms before and after."""
    scored = ~np.isnan(result.raw)
    with figure(path, (11, 4.2), ncols=2) as (fig, (ax0, ax1)):
        ax0.imshow(result.T, cmap="YlGnBu", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(result.T):
            ax0.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.5 else "black")
        ax0.set_xlabel("judge's score")
        ax0.set_ylabel("true score (estimated)")
        ax0.set_title("Score transition matrix T")
        x = np.arange(K)
        ax1.bar(x - 0.2, np.bincount(result.raw[scored].astype(int), minlength=K), 0.4, label="judge")
        ax1.bar(x + 0.2, np.bincount(result.curated[scored].astype(int), minlength=K), 0.4, label="curated")
        ax1.set_xlabel("score (0-5)")
        ax1.set_ylabel("rows")
        ax1.set_title(f"{int(result.changed.sum())} of {int(scored.sum())} scores changed")
        ax1.legend(fontsize="small")
