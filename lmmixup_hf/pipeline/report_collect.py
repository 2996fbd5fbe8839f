"""What the report shows, read from the stage folders a run leaves behind: per-stage summaries
(rows, splits, rejections, time, cost), scores, rejection reasons and example clusters."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmmixup_hf.data.schema import CLUSTER_ID, COMPLETION, ID, PROMPT, RATING
from lmmixup_hf.pipeline.registry import FOLDER_STAGES
from lmmixup_hf.pipeline.workflow import MANIFEST, REJECTED

STAGES = FOLDER_STAGES  # the stages that write a folder, as declared


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def read_table(stage_dir: Path, name: str = "data", columns: list[str] | None = None) -> pa.Table | None:
    """The parquet shards under ``<stage>/<name>/``, only the columns asked for (those present)."""
    files = sorted((stage_dir / name).glob("*.parquet"))
    if not files:
        return None
    schema = pq.read_schema(files[0])
    cols = None if columns is None else [c for c in columns if c in schema.names]
    return pa.concat_tables(pq.read_table(f, columns=cols) for f in files)


def count_rows(stage_dir: Path, name: str = "data") -> int | None:
    """Rows under ``<stage>/<name>/`` (a split) or ``<stage>/<name>/data/`` (a sub-stage folder)."""
    files = sorted((stage_dir / name).glob("*.parquet")) or sorted((stage_dir / name / "data").glob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files) if files else None


def scores(table: pa.Table | None) -> np.ndarray:
    """Compressed 0-5 scores of a rated table (NaN where the judge failed)."""
    if table is None or RATING not in table.column_names:
        return np.zeros(0)
    col = table.column(RATING).combine_chunks()
    if not pa.types.is_struct(col.type) or col.type.get_field_index("score") < 0:
        return np.zeros(0)
    return np.asarray(pc.struct_field(col, "score").to_numpy(zero_copy_only=False), dtype=float)


def find_costs(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numbers under keys that name a cost or a token count, anywhere in a manifest."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and any(w in k.lower() for w in ("cost", "usd", "tokens"))
            ):
                out[key] = float(v)
            elif isinstance(v, dict) and k not in ("params", "inputs", "versions", "estimate"):
                out.update(find_costs(v, f"{key}."))
    return out


@dataclass
class StageSummary:
    name: str
    manifest: dict[str, Any] | None
    rows: int | None
    splits: dict[str, int]
    rejected: int
    seconds: float | None
    costs: dict[str, float]

    @property
    def cost_usd(self) -> float | None:
        usd = [v for k, v in self.costs.items() if "usd" in k.lower() or k.lower().endswith("cost")]
        return max(usd) if usd else None

    @property
    def tokens(self) -> int | None:
        toks = [v for k, v in self.costs.items() if k.lower().endswith("total_tokens")]
        if not toks:
            toks = [
                sum(v for k, v in self.costs.items() if k.lower().endswith(("prompt_tokens", "completion_tokens")))
            ]
        return int(max(toks)) if toks and max(toks) > 0 else None


def summarize(run_dir: Path) -> list[StageSummary]:
    out = []
    for name in STAGES:
        d = run_dir / name
        if not d.exists():
            continue
        m = read_manifest(d)
        splits = {
            p.name: n
            for p in sorted(d.iterdir())
            if p.is_dir()
            and p.name not in ("data",)
            and not p.name.startswith(".")
            and (n := count_rows(d, p.name)) is not None
        }
        out.append(
            StageSummary(
                name=name,
                manifest=m,
                rows=count_rows(d),
                splits=splits,
                rejected=int((m or {}).get("counts", {}).get("rejected", 0)),
                seconds=(m or {}).get("timing", {}).get("seconds"),
                costs=find_costs(m or {}),
            )
        )
    return out


# -- examples -------------------------------------------------------------------------------------
@dataclass
class Example:
    cluster_id: int
    members: list[tuple[str, str]]
    status: str  # "kept", "below threshold", "rejected: <reason>", ...
    prompt: str | None = None
    completion: str | None = None
    think: str | None = None
    score: float | None = None


def collect_examples(run_dir: Path, n: int) -> list[Example]:
    """``n`` clusters next to what the distiller made of them, taken in turn from each outcome
    (kept, below threshold, rejected, ...) so the page shows failures as well as successes."""
    if n <= 0:
        return []
    ids = read_table(run_dir / "cluster", columns=[CLUSTER_ID])
    if ids is None or CLUSTER_ID not in ids.column_names:
        return []
    distilled = read_table(run_dir / "distill", columns=[ID, CLUSTER_ID, PROMPT, COMPLETION, "think", "output"])
    rerated = read_table(run_dir / "rerate", columns=[ID, RATING])
    kept = read_table(run_dir / "filter", columns=[ID])
    score_of = dict(zip(rerated.column(ID).to_pylist(), scores(rerated), strict=True)) if rerated else {}
    kept_ids = set(kept.column(ID).to_pylist()) if kept is not None else None
    by_cluster = {
        int(r[CLUSTER_ID]): r
        for r in (distilled.to_pylist() if distilled is not None else [])
        if r.get(CLUSTER_ID) is not None
    }
    reasons = _distill_rejections(run_dir / "distill")

    def outcome(cid: int) -> tuple[str, float | None]:
        row = by_cluster.get(cid)
        if row is None:
            return (f"rejected: {reasons[cid]}" if cid in reasons else "not distilled (over the limit)"), None
        score = score_of.get(row.get(ID))
        score = None if score is None or np.isnan(score) else float(score)
        if kept_ids is None:
            return "distilled", score
        if row.get(ID) in kept_ids:
            return "kept", score
        return ("below threshold" if score is not None else "unscored"), score

    groups: dict[str, list[int]] = {}
    for cid in sorted({int(c) for c in ids.column(CLUSTER_ID).to_pylist() if c is not None and c >= 0}):
        status = outcome(cid)[0]
        groups.setdefault(status.split(":")[0], []).append(cid)
    picked: list[int] = []
    queues = [list(g) for g in groups.values()]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))

    wanted = pa.array(picked, type=pa.int64())
    table = read_table(run_dir / "cluster", columns=[PROMPT, COMPLETION, CLUSTER_ID])
    table = table.filter(pc.is_in(pc.cast(table.column(CLUSTER_ID), pa.int64()), value_set=wanted))
    members: dict[int, list[tuple[str, str]]] = {}
    for row in table.to_pylist():
        members.setdefault(int(row[CLUSTER_ID]), []).append((row.get(PROMPT) or "", row.get(COMPLETION) or ""))
    out = []
    for cid in sorted(picked):
        status, score = outcome(cid)
        row = by_cluster.get(cid) or {}
        out.append(
            Example(cid, members.get(cid, []), status, row.get(PROMPT), row.get(COMPLETION), row.get("think"), score)
        )
    return out


def _distill_rejections(stage_dir: Path) -> dict[int, str]:
    """cluster id -> why it yielded no row: the distill stage's ``unparsed/`` split (with the
    model's raw reply), else its rejected.jsonl."""
    out: dict[int, str] = {}
    table = read_table(stage_dir, "unparsed", columns=[CLUSTER_ID, "parse_error", "raw_response"])
    if table is not None and CLUSTER_ID in table.column_names:
        for r in table.to_pylist():
            reply = r.get("raw_response")
            out[int(r[CLUSTER_ID])] = (r.get("parse_error") or "unparsed") + (
                f"; the model wrote: {_short(reply, 400)!r}" if reply else ""
            )
        return out
    path = stage_dir / REJECTED
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            m = re.search(r'"cluster_id": (-?\d+)', rec.get("raw") or "")
            if m:
                out[int(m.group(1))] = rec.get("reason", "?")
    return out


def rejection_reasons(run_dir: Path) -> dict[str, Counter]:
    out = {}
    for name in STAGES:
        m = read_manifest(run_dir / name)
        if m and m.get("rejected_by_reason"):
            out[name] = Counter(m["rejected_by_reason"])
    return out


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
