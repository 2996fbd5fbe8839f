"""``lmmixup distill``: turn each cluster of low-quality rows into one fused sample.

Input: the output of ``lmmixup cluster`` (rows with ``cluster_id``; ``cluster_id < 0`` marks
leftovers, which are skipped). Each cluster's members, in id order, become one prompt through
:func:`~lmmixup_hf.distiller.prompts.fit_messages` (whole members are dropped when over
``--max-prompt-tokens``, and counted). The engine's responses are parsed into ``think``/``output``
and a ``prompt``/``completion`` pair; unparseable responses go to ``rejected.jsonl`` with the
reason, and their full rows to the ``unparsed/`` split.

Resumable: clusters are generated in chunks of ``--checkpoint-every``; each finished chunk is a
parquet file under the stage's work folder, and a rerun skips the chunks that exist.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset
from datasets.table import InMemoryTable

from lmmixup_hf.data.io import read_pool
from lmmixup_hf.data.schema import (
    CLUSTER_ID,
    COMPLETION,
    ID,
    MEMBER_IDS,
    PROMPT,
    SOURCE,
    TASK_TYPE,
    LmmixupError,
    normalize_task_type,
)
from lmmixup_hf.distiller.engines import ENGINES, Engine, make_engine
from lmmixup_hf.distiller.prompts import (
    PROMPT_STYLES,
    PROMPT_VERSION,
    fit_messages,
    instruction_for,
    linearize_cluster,
)
from lmmixup_hf.distiller.response_parsing import parse_response
from lmmixup_hf.pipeline.workflow import StageRun

logger = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (CLUSTER_ID, pa.int64()),
        (MEMBER_IDS, pa.list_(pa.string())),
        (SOURCE, pa.string()),
        (TASK_TYPE, pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("think", pa.string()),
        ("output", pa.string()),
        (PROMPT, pa.string()),
        (COMPLETION, pa.string()),
        ("raw_response", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("n_dropped_members", pa.int64()),
        ("parse_ok", pa.bool_()),
        ("parse_error", pa.string()),
    ]
)


@dataclass
class DistillArgs:
    input: str = field(
        metadata={"help": "Clusters: an `lmmixup cluster` output folder, or parquet/jsonl with cluster_id."}
    )
    out: str = field(metadata={"help": "Output folder (data/, unparsed/, rejected.jsonl, manifest.json)."})
    model: str = field(metadata={"help": "Distiller: Hub id, local folder, alias, or the served model name (openai)."})
    engine: str = field(default="transformers", metadata={"help": "Inference engine.", "choices": list(ENGINES)})
    max_prompt_tokens: int = field(
        default=2400, metadata={"help": "Prompt budget; whole members are dropped beyond it."}
    )
    max_new_tokens: int = field(default=1024, metadata={"help": "Generation budget per cluster."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (only when temperature > 0)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "1.0 = off."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    checkpoint_every: int = field(default=64, metadata={"help": "Clusters per checkpointed chunk."})
    limit: int | None = field(default=None, metadata={"help": "Distill only the first N clusters (smoke runs)."})
    task_type: str | None = field(default=None, metadata={"help": "Override every cluster's task type."})
    prompt_style: str = field(
        default="ours",
        metadata={
            "help": "ours, or reference: the paper's prompt, for a distiller trained by its code.",
            "choices": list(PROMPT_STYLES),
        },
    )
    # transformers
    batch_size: int = field(default=8, metadata={"help": "transformers: prompts per generate() call."})
    device: str | None = field(default=None, metadata={"help": "transformers: cpu, cuda, cuda:1 (default: auto)."})
    dtype: str = field(
        default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16."}
    )
    attn_implementation: str = field(
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
    think_tokens: int = field(default=48, metadata={"help": "transformers, with --scaffold: reasoning budget."})
    answer_prefix: str = field(
        default="", metadata={"help": "transformers, with --scaffold: text that opens the answer, e.g. 'Q:' for qa."}
    )
    # vllm
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs per model replica."})
    data_parallel_size: int = field(default=1, metadata={"help": "vllm: model replicas."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm: fraction of GPU memory."})
    max_model_len: int | None = field(default=None, metadata={"help": "vllm: context length cap."})
    # openai
    base_url: str | None = field(default=None, metadata={"help": "openai: server URL (default $OPENAI_BASE_URL)."})
    api_key: str | None = field(
        default=None, metadata={"help": "openai: key (default $OPENAI_API_KEY; never written)."}
    )
    max_concurrency: int = field(default=16, metadata={"help": "openai: requests in flight."})
    tokenizer: str | None = field(default=None, metadata={"help": "openai: tokenizer for the prompt budget."})
    cache_dir: str | None = field(default=None, metadata={"help": "openai: response cache folder."})


def _load_clusters(path: str) -> Dataset:
    ds = read_pool(path)  # a clusters file's cluster_id comes through as a real column
    missing = [c for c in (CLUSTER_ID, ID, PROMPT, COMPLETION) if c not in ds.column_names]
    if missing:
        raise LmmixupError(
            f"{path}: not a clusters table; missing column(s) {', '.join(missing)} (run `lmmixup cluster` first)"
        )
    return ds


def group_clusters(cluster_ids: np.ndarray, ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(cluster_id, row indices in id order)`` for every cluster with ``cluster_id >= 0``."""
    order = np.lexsort((ids, cluster_ids))
    sorted_c = cluster_ids[order]
    keep = sorted_c >= 0
    order, sorted_c = order[keep], sorted_c[keep]
    if len(order) == 0:
        return
    bounds = np.flatnonzero(np.diff(sorted_c)) + 1
    for chunk in np.split(order, bounds):
        yield int(cluster_ids[chunk[0]]), chunk


def _cluster_row(cid: int, rows: dict[str, list], task_override: str | None) -> dict[str, Any]:
    sources = sorted(set(rows.get(SOURCE) or [""]))
    source = "+".join(s for s in sources if s) or ""
    types = rows.get(TASK_TYPE) or ["qa"]
    task = normalize_task_type(task_override or max(set(types), key=types.count))
    return {
        ID: f"mixup-{source or 'pool'}-{cid}",
        CLUSTER_ID: cid,
        SOURCE: source,
        TASK_TYPE: task,
        "members": list(zip(rows[PROMPT], rows[COMPLETION])),
        "member_ids": [str(x) for x in rows[ID]],
    }


def _record(cluster: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """One output row: the cluster's identity plus ``fields``; every other column empty."""
    row: dict[str, Any] = {name: None for name in SCHEMA.names}
    row.update(prompt_tokens=0, completion_tokens=0)
    row.update({k: cluster[k] for k in (ID, CLUSTER_ID, SOURCE, TASK_TYPE)}, **{MEMBER_IDS: cluster["member_ids"]})
    row.update(fields)
    row["parse_ok"] = row["parse_error"] is None
    return row


def _write_part(path: Path, rows: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(stats))


# -- the core: clusters in, one parsed record per cluster out (no files) ---------------------------
def distill_chunk(
    members: Dataset,
    clusters: Sequence[tuple[int, np.ndarray]],
    engine: Engine,
    *,
    task_type: str | None = None,
    max_prompt_tokens: int = 2400,
    prompt_style: str = "ours",
    max_new_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> list[dict[str, Any]]:
    """Fuse each cluster (``(cluster_id, row indices into members)``) with one batched generation.
    Every cluster gives one record: parsed (``parse_ok``) or with the reason it was not."""
    rows, convs, over_budget = [], [], []
    for cid, idx in clusters:
        c = _cluster_row(cid, members[idx.tolist()], task_type)
        messages, dropped = fit_messages(
            engine.tokenizer, c["members"], c[TASK_TYPE], max_prompt_tokens, style=prompt_style
        )
        if messages is None:
            over_budget.append((c, dropped))
            continue
        kept = len(c["members"]) - dropped
        c.update(
            member_ids=c["member_ids"][:kept],
            n_dropped_members=dropped,
            instruction=instruction_for(c[TASK_TYPE], prompt_style),
            input=linearize_cluster(c["members"][:kept], prompt_style),
        )
        rows.append(c)
        convs.append(messages)
    gens = (
        engine.generate(
            convs,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        if convs
        else []
    )
    out_rows = []
    for c, g in zip(rows, gens):
        parsed = parse_response(g.text, c[TASK_TYPE])
        error = parsed.error
        if g.error:
            error = f"generation failed: {g.error}"
        elif error and g.finish_reason == "length":
            error = f"truncated at max_new_tokens ({error})"
        elif g.finish_reason == "length" and g.text.rstrip().endswith(parsed.completion or ""):
            # the kept completion runs into the cut, so it may be incomplete
            error = "truncated at max_new_tokens (the answer was cut off)"
        out_rows.append(
            _record(
                c,
                instruction=c["instruction"],
                input=c["input"],
                think=parsed.think,
                output=parsed.output,
                prompt=parsed.prompt,
                completion=parsed.completion,
                raw_response=g.text,
                finish_reason=g.finish_reason,
                prompt_tokens=g.prompt_tokens,
                completion_tokens=g.completion_tokens,
                n_dropped_members=c["n_dropped_members"],
                parse_error=error,
            )
        )
    for c, dropped in over_budget:
        out_rows.append(
            _record(
                c,
                instruction=instruction_for(c[TASK_TYPE], prompt_style),
                finish_reason="skipped",
                n_dropped_members=dropped,
                parse_error=f"over the prompt budget (not even one member fits in {max_prompt_tokens} tokens)",
            )
        )
    return out_rows


def distill_rows(clustered: Dataset, engine: Engine, *, batch: int = 64, **generation: Any) -> tuple[Dataset, Dataset]:
    """Distil every cluster of a clustered Dataset in memory: ``(distilled, unparsed)``.

    >>> distilled, unparsed = distill_rows(clustered, make_engine("transformers", "org/distiller"))
    """
    cluster_ids = np.asarray(clustered[CLUSTER_ID], dtype=np.int64)
    clusters = list(group_clusters(cluster_ids, np.asarray([str(x) for x in clustered[ID]])))
    columns = [c for c in (ID, PROMPT, COMPLETION, SOURCE, TASK_TYPE) if c in clustered.column_names]
    members = clustered.select_columns(columns)
    records = [
        r
        for i in range(0, len(clusters), batch)
        for r in distill_chunk(members, clusters[i : i + batch], engine, **generation)
    ]
    result = Dataset(InMemoryTable(pa.Table.from_pylist(records, schema=SCHEMA)))
    ok = np.asarray(result["parse_ok"], dtype=bool)
    return result.select(np.flatnonzero(ok)), result.select(np.flatnonzero(~ok))


# -- the command: checkpoints per chunk, manifest and throughput around the core --------------------
def distill(args: DistillArgs, engine: Engine | None = None) -> Dataset:
    """Run the stage (or return its output when it is up to date). ``engine`` lets a caller that
    already holds a loaded model reuse it."""
    from tqdm.auto import tqdm

    if args.engine not in ENGINES:
        raise LmmixupError(f"unknown engine {args.engine!r}; choose one of {', '.join(ENGINES)}")
    params = asdict(args)
    for k in ("out", "checkpoint_every", "max_concurrency", "cache_dir", "device", "batch_size"):
        params.pop(k, None)  # they do not change the result, so they must not invalidate finished work
    if args.prompt_style not in PROMPT_STYLES:
        raise LmmixupError(f"unknown prompt_style {args.prompt_style!r}; choose one of {', '.join(PROMPT_STYLES)}")
    if params.get("prompt_style") == "ours":
        params.pop("prompt_style")  # the default: runs made before the option keep their fingerprint
    params["prompt_version"] = PROMPT_VERSION
    run = StageRun("distill", args.out, inputs=[args.input], params=params)
    if run.is_complete():
        logger.info("distill: up to date, skipping (%s)", args.out)
        return run.load()

    ds = _load_clusters(args.input)
    cluster_ids = np.asarray(ds[CLUSTER_ID], dtype=np.int64)
    ids = np.asarray([str(x) for x in ds[ID]])
    clusters = list(group_clusters(cluster_ids, ids))
    n_leftover = int((cluster_ids < 0).sum())
    if args.limit is not None:
        clusters = clusters[: args.limit]
    if not clusters:
        raise LmmixupError(f"{args.input}: no clusters with cluster_id >= 0")
    columns = [c for c in (ID, PROMPT, COMPLETION, SOURCE, TASK_TYPE) if c in ds.column_names]
    members_table = ds.select_columns(columns)

    step = max(1, args.checkpoint_every)
    chunks = [clusters[i : i + step] for i in range(0, len(clusters), step)]
    work = run.work_dir
    todo = [k for k in range(len(chunks)) if not (work / f"part-{k:06d}.parquet").exists()]
    if len(todo) < len(chunks):
        logger.info("distill: resuming, %d of %d chunks already done", len(chunks) - len(todo), len(chunks))

    generation = {
        "task_type": args.task_type,
        "max_prompt_tokens": args.max_prompt_tokens,
        "prompt_style": args.prompt_style,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
    }
    bar = tqdm(total=len(clusters), desc="distill", unit="cluster", dynamic_ncols=True)
    bar.update(sum(len(chunks[k]) for k in range(len(chunks)) if k not in set(todo)))
    if todo and engine is None:
        options = {k: v for k, v in asdict(args).items() if k not in ("engine", "model")}
        engine = make_engine(args.engine, args.model, **options)
    for k in todo:
        t0 = time.time()
        out_rows = distill_chunk(members_table, chunks[k], engine, **generation)
        seconds = time.time() - t0
        _write_part(work / f"part-{k:06d}.parquet", out_rows, {"seconds": seconds, "clusters": len(chunks[k])})
        bar.update(len(chunks[k]))
    bar.close()

    parts = [work / f"part-{k:06d}.parquet" for k in range(len(chunks))]
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else SCHEMA.empty_table()
    result = Dataset(InMemoryTable(table))
    ok = np.asarray(result["parse_ok"], dtype=bool)
    good = result.select(np.flatnonzero(ok))
    bad = result.select(np.flatnonzero(~ok))
    for row in bad:
        run.quarantine.add(
            args.input,
            None,
            "raw_response" if row["raw_response"] is not None else "input",
            row["parse_error"],
            {ID: row[ID], CLUSTER_ID: row[CLUSTER_ID], "raw_response": row["raw_response"]},
        )

    seconds = sum(json.loads(p.with_suffix(".json").read_text())["seconds"] for p in parts)
    p_tok, c_tok = int(np.sum(result["prompt_tokens"])), int(np.sum(result["completion_tokens"]))
    throughput = {
        "generation_seconds": round(seconds, 3),
        "rows_per_s": round(len(result) / seconds, 4) if seconds else None,
        "completion_tokens_per_s": round(c_tok / seconds, 2) if seconds else None,
        "total_tokens_per_s": round((p_tok + c_tok) / seconds, 2) if seconds else None,
        "prompt_tokens": p_tok,
        "completion_tokens": c_tok,
    }
    counts = {
        "clusters": len(clusters),
        "leftover_rows": n_leftover,
        "distilled": len(good),
        "unparsed": len(bad),
        "members_dropped": int(np.sum(result["n_dropped_members"])),
        "truncated": int(np.sum(np.asarray(result["finish_reason"]) == "length")),
    }
    extra = {"throughput": throughput}
    if engine is not None:
        extra["engine"] = engine.describe()
    run.finish(good, counts=counts, extra=extra, splits={"unparsed": bad})
    logger.info(
        "distill: %d clusters -> %d distilled, %d unparsed; %.1f completion tokens/s",
        len(clusters),
        len(good),
        len(bad),
        throughput["completion_tokens_per_s"] or 0.0,
    )
    return good
