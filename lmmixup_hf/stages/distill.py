"""The distill core: each cluster of low-quality rows in, one fused, parsed sample out.

A cluster's members, in id order, become one prompt through
:func:`~lmmixup_hf.distiller.prompts.fit_messages` (whole members are dropped when over the prompt
budget, and counted). The engine's responses are parsed into ``think``/``output`` and a
``prompt``/``completion`` pair; a response that cannot be parsed keeps the reason in
``parse_error``. A generation that failed for a reason outside the reply (transport, 429, 5xx,
timeout) is marked ``finish_reason="error"`` (:func:`failed_mask`): it is no verdict on the cluster,
so ``lmmixup distill`` retries it on the next run instead of quarantining it. Leftover rows
(``cluster_id < 0``) are skipped::

    distilled, unparsed = distill_rows(clustered, make_engine("transformers", "org/distiller"))

No files: ``lmmixup distill`` (:mod:`lmmixup_hf.pipeline.distill`) adds the per-chunk checkpoints
and the manifest around it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.table import InMemoryTable

from lmmixup_hf.data.arrow_files import column_values
from lmmixup_hf.data.schema import (
    CLUSTER_ID,
    COMPLETION,
    ID,
    MEMBER_IDS,
    PROMPT,
    SOURCE,
    TASK_TYPE,
    normalize_task_type,
)
from lmmixup_hf.distiller.engines import Engine
from lmmixup_hf.distiller.prompts import (
    PromptStyle,
    fit_messages,
    instruction_for,
    linearize_cluster,
)
from lmmixup_hf.distiller.response_parsing import parse_response
from lmmixup_hf.options import NON_DEFAULT, Options, check_task_type, resolve

logger = logging.getLogger(__name__)

# the finish reason of a generation that failed before any reply arrived (retried, never final)
FAILED_REASON = "error"

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


def failed_mask(table: pa.Table) -> np.ndarray:
    """Which records failed for a reason outside the reply (to retry), as opposed to replies that
    arrived and could not be parsed (final)."""
    failed = pc.equal(table.column("finish_reason"), FAILED_REASON)
    return np.asarray(pc.fill_null(failed, False).to_numpy(zero_copy_only=False), dtype=bool)


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


@dataclass
class GenerationOptions(Options):
    """How each cluster becomes a prompt and a reply (``lmmixup distill`` takes the same options as
    flags; its arguments dataclass extends this one, so each default is written here only)."""

    task_type: str | None = field(default=None, metadata={"help": "Override every cluster's task type."})
    max_prompt_tokens: int = field(
        default=2400, metadata={"help": "Prompt budget; whole members are dropped beyond it.", "range": "[1, inf)"}
    )
    prompt_style: PromptStyle = field(
        default="ours",
        # hashed only when not the default: runs made before the option keep their fingerprint
        metadata={
            "help": "ours, or reference: the paper's prompt, for a distiller trained by its code.",
            "fingerprint": NON_DEFAULT,
        },
    )
    max_new_tokens: int = field(default=1024, metadata={"help": "Generation budget per cluster.", "range": "[1, inf)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy.", "range": "[0, inf)"})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling (only when temperature > 0).", "range": "(0, 1]"}
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "1.0 = off.", "range": "(0, inf)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_task_type(self)


# -- the core: clusters in, one parsed record per cluster out (no files) ---------------------------
def distill_chunk(
    members: Dataset,
    clusters: Sequence[tuple[int, np.ndarray]],
    engine: Engine,
    options: GenerationOptions | None = None,
    **changes: Any,
) -> list[dict[str, Any]]:
    """Fuse each cluster (``(cluster_id, row indices into members)``) with one batched generation.
    Every cluster gives one record: parsed (``parse_ok``) or with the reason it was not.
    ``options`` (:class:`GenerationOptions`) may be given, or changed, by keyword."""
    o = resolve(GenerationOptions, options, changes)
    task_type, max_prompt_tokens, prompt_style = o.task_type, o.max_prompt_tokens, o.prompt_style
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
            max_new_tokens=o.max_new_tokens,
            temperature=o.temperature,
            top_p=o.top_p,
            repetition_penalty=o.repetition_penalty,
        )
        if convs
        else []
    )
    out_rows = []
    for c, g in zip(rows, gens):
        parsed = parse_response(g.text, c[TASK_TYPE])
        error = parsed.error
        finish_reason = g.finish_reason
        if g.error:
            error, finish_reason = f"generation failed: {g.error}", FAILED_REASON
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
                finish_reason=finish_reason,
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


def distill_rows(
    clustered: Dataset,
    engine: Engine,
    options: GenerationOptions | None = None,
    *,
    batch: int = 64,
    limit: int | None = None,
    **changes: Any,
) -> tuple[Dataset, Dataset]:
    """Distil every cluster of a clustered Dataset in memory: one fused, parsed row per cluster.

    Args:
        clustered: Rows with a ``cluster_id`` (``cluster_rows(...).rows``).
        engine: The distiller (:func:`~lmmixup_hf.distiller.engines.make_engine`).
        options: The generation options (:class:`GenerationOptions`: ``max_new_tokens``,
            ``temperature``, ``top_p``, ...; default their defaults).
        batch: Clusters per ``engine.generate`` call.
        limit: Distil only the first ``limit`` clusters (as ``lmmixup distill --limit``).
        **changes: Generation options changed from ``options``; a bad one raises ``OptionError``.

    Returns:
        ``(distilled, unparsed)``: the parsed rows (``prompt``/``completion`` split out of the
        output, ``member_ids``, ``think``, ``raw_response``), and the clusters whose reply could not
        be parsed, each with its ``parse_error`` (never dropped silently). Generations that failed
        (``finish_reason="error"``) come back in ``unparsed`` with their error; ``lmmixup distill``
        retries them instead.

    Example::

        engine = make_engine("transformers", "org/distiller")
        distilled, unparsed = distill_rows(clusters.rows, engine, max_new_tokens=512)
    """
    options = resolve(GenerationOptions, options, changes)
    clusters, members = cluster_members(clustered)
    clusters = clusters[:limit]
    chunks = [clusters[i : i + batch] for i in range(0, len(clusters), batch)]
    distilled = DistillBatch(lambda: engine, asdict(options))(chunk_table(members, chunks, range(len(chunks))))
    records = [r for _, rows, _, _ in chunk_results(distilled) for r in rows]
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    good = split_parsed(table)[0]
    return good, Dataset(InMemoryTable(table.filter(pc.invert(pc.fill_null(table["parse_ok"], False)))))


# -- the pieces the command shares with distill_rows; DistillBatch runs on a worker ----------------
MEMBER_COLUMNS = (ID, PROMPT, COMPLETION, SOURCE, TASK_TYPE)  # what the distiller reads of a member


def cluster_members(clustered: Dataset) -> tuple[list[tuple[int, np.ndarray]], Dataset]:
    """The clusters (``(cluster_id, member row indices in id order)``, leftovers aside) and the
    member columns the distiller reads."""
    cluster_ids = column_values(clustered, CLUSTER_ID).astype(np.int64)
    clusters = list(group_clusters(cluster_ids, column_values(clustered, ID).astype(str)))
    return clusters, clustered.select_columns([c for c in MEMBER_COLUMNS if c in clustered.column_names])


def chunk_table(members: Dataset, chunks: Sequence[Sequence[tuple[int, Any]]], todo: Iterable[int]) -> pa.Table:
    """One row per chunk ``k`` in ``todo``: its clusters' members as Arrow (with their cluster id),
    so a worker distils exactly the clusters of that chunk, in one engine batch."""
    ks, blobs = [], []
    arrow = members.with_format("arrow")
    for k in todo:
        if not chunks[k]:
            continue
        idx = np.concatenate([np.asarray(i) for _, i in chunks[k]])
        cids = np.concatenate([np.full(len(i), c, np.int64) for c, i in chunks[k]])
        ks.append(k)
        blobs.append(to_ipc(arrow[idx.tolist()].append_column(CLUSTER_ID, pa.array(cids))))
    return pa.table({"k": pa.array(ks, pa.int64()), "members": pa.array(blobs, pa.binary())})


class DistillBatch:
    """Distil a batch of :func:`chunk_table` rows with one engine (built once, by ``make_engine``):
    per chunk its records (Arrow, :data:`SCHEMA`), the seconds it took and the engine's description."""

    def __init__(self, make_engine: Callable[[], Engine], generation: Mapping[str, Any]):
        self.engine = make_engine()
        self.generation = dict(generation)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {"k": [], "part": [], "seconds": [], "engine": []}
        for k, blob in zip(batch["k"].to_pylist(), batch["members"].to_pylist()):
            clusters, members = cluster_members(Dataset(InMemoryTable(from_ipc(blob))))
            t0 = time.time()
            rows = distill_chunk(members, clusters, self.engine, **self.generation)
            out["k"].append(k)
            out["part"].append(to_ipc(pa.Table.from_pylist(rows, schema=SCHEMA)))
            out["seconds"].append(time.time() - t0)
            out["engine"].append(json.dumps(self.engine.describe(), default=str))
        self.engine.flush()  # a worker may be stopped at any time after its batch is returned
        return pa.table(out, schema=CHUNK_RESULT)


CHUNK_RESULT = pa.schema(
    [("k", pa.int64()), ("part", pa.binary()), ("seconds", pa.float64()), ("engine", pa.string())]
)


def chunk_results(out: pa.Table) -> Iterator[tuple[int, list[dict[str, Any]], float, dict[str, Any]]]:
    """``(chunk, records, seconds, engine description)`` for each chunk a :class:`DistillBatch` returned."""
    for k, blob, seconds, described in zip(*(out[c].to_pylist() for c in CHUNK_RESULT.names)):
        yield k, from_ipc(blob).to_pylist(), seconds, json.loads(described)


SECONDS = b"lmmixup.distill.seconds"  # a block part's generation seconds, all its runs (schema metadata)


class DistillBlock:
    """Distil the clusters of one block (:mod:`lmmixup_hf.execution.blocks`: whole clusters, rows in
    cluster order) with one engine, built once per worker by ``make_engine``, as :class:`DistillBatch`
    does. With the block's ``previous`` part only its failed clusters are asked again, the others
    kept (:func:`merge_records`). The record counts the clusters and carries the engine's description."""

    def __init__(self, make_engine: Callable[[], Engine], generation: Mapping[str, Any]):
        self.engine = make_engine()
        self.generation = dict(generation)

    def __call__(self, rows: pa.Table, block: Any, previous: pa.Table | None) -> tuple[pa.Table, dict[str, Any]]:
        clusters, members = cluster_members(Dataset(InMemoryTable(rows)))
        seconds = 0.0
        if previous is not None:
            retry = set(np.asarray(previous[CLUSTER_ID])[failed_mask(previous)].tolist())
            clusters = [c for c in clusters if c[0] in retry]
            seconds = float((previous.schema.metadata or {}).get(SECONDS, 0))
        t0 = time.time()
        new = distill_chunk(members, clusters, self.engine, **self.generation) if clusters else []
        seconds += time.time() - t0
        self.engine.flush()  # a worker may be stopped at any time after its block is written
        part = merge_records(previous, new).replace_schema_metadata({SECONDS: str(seconds)})
        record = {
            "clusters": part.num_rows,
            "asked": len(clusters),
            "failed": int(failed_mask(part).sum()),
            "seconds": seconds,
            "engine": json.loads(json.dumps(self.engine.describe(), default=str)),
        }
        return part, record


def merge_records(previous: pa.Table | None, rows: list[dict[str, Any]]) -> pa.Table:
    """A chunk's records (:data:`SCHEMA`); with its ``previous`` ones (a rerun of its failed
    clusters), the new records replace the old ones of the same clusters, in place."""
    if previous is not None:
        new = {r[CLUSTER_ID]: r for r in rows}
        rows = [new.pop(r[CLUSTER_ID], r) for r in previous.to_pylist()] + list(new.values())
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def parsed_masks(records: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks ``(distilled, unparsed, failed)`` over ``records`` (see :func:`split_parsed`)."""
    ok = np.asarray(pc.fill_null(records["parse_ok"], False).to_numpy(zero_copy_only=False), dtype=bool)
    failed = failed_mask(records)
    return ok, ~ok & ~failed, failed


def split_parsed(records: pa.Table) -> tuple[Dataset, Dataset, Dataset]:
    """``(distilled, unparsed, failed)``: parsed records, replies that could not be parsed (final,
    with their ``parse_error``), and generations that failed for a reason outside the reply (to retry)."""
    result = Dataset(InMemoryTable(records))
    return tuple(result.select(np.flatnonzero(m)) for m in parsed_masks(records))  # type: ignore[return-value]


def to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes (one value of a binary column)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(blob).read_all()
