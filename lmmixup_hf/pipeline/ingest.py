"""``lmmixup ingest``: validate a pool onto the data contract, quarantining bad rows.

Streams: a parquet pool is read, validated (vectorised) and written batch by batch, so memory is
bounded by a batch whatever the pool's size."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from datasets import Dataset

from lmmixup_hf.data.io import StageWriter, iter_pool
from lmmixup_hf.data.schema import DEFAULT_MAX_CHARS
from lmmixup_hf.execution.base import Executor
from lmmixup_hf.options import Options
from lmmixup_hf.pipeline.workflow import StageRun

logger = logging.getLogger(__name__)


@dataclass
class IngestArgs(Options):
    input: str = field(metadata={"help": "Pool: .jsonl, .json, .parquet, a saved dataset folder or a Hub id."})
    out: str = field(metadata={"help": "Output folder (data/*.parquet, rejected.jsonl, manifest.json)."})
    max_chars: int = field(
        default=DEFAULT_MAX_CHARS, metadata={"help": "Reject rows longer than this.", "range": "[1, inf)"}
    )
    source: str | None = field(default=None, metadata={"help": "Default `source` (default: the file name)."})


def ingest(args: IngestArgs, executor: Executor | None = None) -> Dataset:
    run = StageRun("ingest", args.out, inputs=[args.input], params=args)
    if run.is_complete():
        logger.info("ingest: up to date, skipping (%s)", args.out)
        return run.load()
    rows = iter_pool(args.input, quarantine=run.quarantine, max_chars=args.max_chars, default_source=args.source)
    with StageWriter(run.out_dir, mirror=True) as out:
        for table in rows:
            out.write(table)
    run.finish(None, counts={"rows_in": out.rows + len(run.quarantine), "rows_out": out.rows})
    logger.info("ingest: %d rows kept, %s", out.rows, run.quarantine.summary())
    return out.dataset()
