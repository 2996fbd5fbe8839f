"""``lmmixup distill``: fuse every cluster with the distiller, resumably.

Clusters are distilled in chunks of ``--checkpoint_every``; each finished chunk is written under the
stage's work folder at once, so Ctrl-C or SIGKILL loses at most the chunk in flight and a rerun
resumes after the last finished one. A cluster whose generation failed for a reason outside the
reply (transport, 429, 5xx, timeout, after ``--max_retries``) goes to ``failed.jsonl``, not to the
quarantine: the stage is then partial (exit 3, ``"complete": false``) and a rerun asks again for those
clusters only. A reply that arrived but cannot be parsed is final (``unparsed/``, with its text).
The distilling itself is :mod:`lmmixup_hf.stages.distill`; this module adds the files, the manifest
and the throughput figures around it. On an executor out of this process (Ray) the workers read and
write the clusters themselves (:mod:`lmmixup_hf.pipeline.distill_blocks`)."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset

from lmmixup_hf.data.schema import CLUSTER_ID, LmmixupError
from lmmixup_hf.distiller.engines import Engine, EngineName, make_engine
from lmmixup_hf.distiller.prompts import PROMPT_VERSION
from lmmixup_hf.execution.base import Executor, LocalExecutor
from lmmixup_hf.pipeline.distill_blocks import distill_on_blocks, load_clusters, write_outputs
from lmmixup_hf.pipeline.registry import stage
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.stages.distill import (
    DistillBatch,
    GenerationOptions,
    chunk_results,
    chunk_table,
    cluster_members,
    failed_mask,
    merge_records,
)

logger = logging.getLogger(__name__)


@dataclass
class DistillArgs(GenerationOptions):
    """The generation options (:class:`~lmmixup_hf.stages.distill.GenerationOptions`), the engine's
    and the stage's own. Operational ones (``"fingerprint": False``) never invalidate finished work."""

    input: str = field(
        kw_only=True,
        metadata={"help": "Clusters: an `lmmixup cluster` output folder, or parquet/jsonl with cluster_id."},
    )
    out: str = field(
        kw_only=True, metadata={"help": "Output folder (data/, unparsed/, rejected.jsonl, manifest.json)."}
    )
    model: str = field(
        kw_only=True,
        metadata={"help": "Distiller: Hub id, local folder, alias, or the served model name (openai)."},
    )
    engine: EngineName = field(default="transformers", metadata={"help": "Inference engine."})
    seed: int = field(default=0, metadata={"help": "Sampling seed.", "range": "[0, inf)"})
    checkpoint_every: int = field(
        default=64, metadata={"help": "Clusters per checkpointed chunk.", "range": "[1, inf)", "fingerprint": False}
    )
    limit: int | None = field(
        default=None, metadata={"help": "Distill only the first N clusters (smoke runs).", "range": "[1, inf)"}
    )
    # transformers
    batch_size: int = field(
        default=8,
        metadata={"help": "transformers: prompts per generate() call.", "range": "[1, inf)", "fingerprint": False},
    )
    device: str | None = field(
        default=None, metadata={"help": "transformers: cpu, cuda, cuda:1 (default: auto).", "fingerprint": False}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16."}
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(
        default="sdpa", metadata={"help": "transformers: sdpa, eager or flash_attention_2."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    scaffold: bool = field(
        default=False,
        metadata={
            "help": "transformers: the engine writes the <think>/<answer> "
            "tags and the model fills them (for untrained models)."
        },
    )
    think_tokens: int = field(
        default=48, metadata={"help": "transformers, with --scaffold: reasoning budget.", "range": "[0, inf)"}
    )
    answer_prefix: str = field(
        default="", metadata={"help": "transformers, with --scaffold: text that opens the answer, e.g. 'Q:' for qa."}
    )
    # vllm
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "vllm: GPUs per model replica.", "range": "[1, inf)"}
    )
    data_parallel_size: int = field(default=1, metadata={"help": "vllm: model replicas.", "range": "[1, inf)"})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vllm: fraction of GPU memory.", "range": "(0, 1]"}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "vllm: context length cap.", "range": "[1, inf)"}
    )
    # openai
    base_url: str | None = field(default=None, metadata={"help": "openai: server URL (default $OPENAI_BASE_URL)."})
    api_key: str | None = field(
        default=None, metadata={"help": "openai: key (default $OPENAI_API_KEY; never written).", "fingerprint": False}
    )
    max_concurrency: int = field(
        default=16, metadata={"help": "openai: requests in flight.", "range": "[1, inf)", "fingerprint": False}
    )
    max_retries: int = field(
        default=6,
        metadata={
            "help": "openai: retries on 429/5xx/timeouts; a cluster that still fails goes to failed.jsonl "
            "and the next run retries it (ignored by transformers/vllm).",
            "range": "[0, inf)",
            "fingerprint": False,
        },
    )
    retry_base_delay: float = field(
        default=1.0,
        metadata={
            "help": "openai: first backoff in seconds (doubles, with jitter; ignored by transformers/vllm).",
            "range": "[0, inf)",
            "fingerprint": False,
        },
    )
    tokenizer: str | None = field(default=None, metadata={"help": "openai: tokenizer for the prompt budget."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "openai: response cache folder (default, or 'none': no cache).", "fingerprint": False},
    )


def _part(work: Path, k: int) -> Path:
    return work / f"part-{k:06d}.parquet"


def _left_to_do(work: Path, chunks: list[list[tuple[int, Any]]]) -> tuple[list[list[tuple[int, Any]]], list[int]]:
    """Per chunk, the clusters still to distill (all of a chunk without a part file; the failed ones
    of a finished chunk), and the chunks with any left."""
    runs, todo = list(chunks), []
    for k, chunk in enumerate(chunks):
        path = _part(work, k)
        if path.exists():
            table = pq.read_table(path, columns=[CLUSTER_ID, "finish_reason"])
            retry = set(np.asarray(table.column(CLUSTER_ID))[failed_mask(table)].tolist())
            runs[k] = [c for c in chunk if c[0] in retry]
        if runs[k]:
            todo.append(k)
    return runs, todo


def _write_part(path: Path, rows: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    """Write a chunk's records; when the chunk was written before (a rerun of its failed clusters),
    the new records replace the old ones of the same clusters, in place."""
    previous = pq.read_table(path) if path.exists() else None
    if previous is not None:
        stats = {**stats, "seconds": stats["seconds"] + json.loads(path.with_suffix(".json").read_text())["seconds"]}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(merge_records(previous, rows), tmp)
    path.with_suffix(".json").write_text(json.dumps(stats))
    os.replace(tmp, path)


# -- the command: checkpoints per chunk, manifest and throughput around the core --------------------
def distill(args: DistillArgs, engine: Engine | None = None, executor: Executor | None = None) -> Dataset:
    """Run the stage (or return its output when it is up to date). ``engine`` lets a caller that
    already holds a loaded model reuse it; ``executor`` runs the chunks (default: here)."""
    from tqdm.auto import tqdm

    run = StageRun("distill", args.out, inputs=[args.input], params=args, tags={"prompt_version": PROMPT_VERSION})
    if run.is_complete():
        logger.info("distill: up to date, skipping (%s)", args.out)
        return run.load()

    generation = {f.name: getattr(args, f.name) for f in fields(GenerationOptions)}
    if engine is not None:  # a loaded model lives in this process
        executor, make = LocalExecutor(), lambda: engine
    else:
        options = {k: v for k, v in asdict(args).items() if k not in ("engine", "model")}
        # resolved here, so engines built elsewhere (Ray actors on other nodes) use the driver's endpoint
        options["base_url"] = args.base_url or os.environ.get("OPENAI_BASE_URL")
        options["api_key"] = args.api_key or os.environ.get("OPENAI_API_KEY")
        if str(args.cache_dir).lower() == "none":  # as `lmmixup rate` spells "no cache"
            options["cache_dir"] = None
        make = partial(make_engine, args.engine, args.model, **options)
    executor = executor or LocalExecutor()
    if not executor.in_process:  # on a cluster the workers read and write the rows; the driver never holds them
        distill_on_blocks(run, args, executor, make, generation)
        return run.load()

    ds = load_clusters(args.input)
    clusters, members = cluster_members(ds)
    n_leftover = int((np.asarray(ds[CLUSTER_ID], dtype=np.int64) < 0).sum())
    if args.limit is not None:
        clusters = clusters[: args.limit]
    if not clusters:
        raise LmmixupError(f"{args.input}: no clusters with cluster_id >= 0")

    step = args.checkpoint_every
    chunks = [clusters[i : i + step] for i in range(0, len(clusters), step)]
    work = run.work_dir
    # what is left: whole chunks never finished, and the failed clusters of finished ones
    runs, todo = _left_to_do(work, chunks)
    left = sum(len(runs[k]) for k in todo)
    if left < len(clusters):
        logger.info("distill: resuming, %d of %d clusters left to distill", left, len(clusters))

    bar = tqdm(total=len(clusters), desc="distill", unit="cluster", dynamic_ncols=True)
    bar.update(len(clusters) - left)

    def finished(k: int, out_rows: list[dict[str, Any]], seconds: float) -> None:
        _write_part(_part(work, k), out_rows, {"seconds": seconds, "clusters": len(chunks[k])})
        bar.update(len(runs[k]))

    described: dict[str, Any] = {}
    table = chunk_table(members, runs, todo)
    for out in executor.map_batches(partial(DistillBatch, make, generation), table, stage("distill").part("distill")):
        for k, rows, seconds, engine_info in chunk_results(out):
            finished(k, rows, seconds)
            described = described or {**engine_info, "executor": executor.name}
    bar.close()

    parts = [_part(work, k) for k in range(len(chunks))]
    seconds = sum(json.loads(p.with_suffix(".json").read_text())["seconds"] for p in parts)
    write_outputs(run, args, parts, seconds, {"clusters": len(clusters), "leftover_rows": n_leftover}, described)
    return run.load()
