"""``lmmixup report``: one page that says what a pipeline run did, from what the stages wrote.

Everything comes from the stage folders under ``runs/<name>/`` (``manifest.json``, ``data/``,
splits, ``rejected.jsonl``), so the report can be rebuilt at any time and shows a partial run as
far as it got. It writes ``report.html`` (self-contained: the plots are embedded) and
``report.md`` (the plots as files under ``report/``).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmmixup_hf.data.schema import CLUSTER_ID, COMPLETION, ID, LONG_TAIL, PROMPT, RATING, LmmixupError
from lmmixup_hf.execution.base import Executor
from lmmixup_hf.options import Options
from lmmixup_hf.pipeline.registry import FOLDER_STAGES
from lmmixup_hf.pipeline.workflow import MANIFEST, REJECTED, input_status
from lmmixup_hf.plotting import figure

logger = logging.getLogger(__name__)

STAGES = FOLDER_STAGES  # the stages that write a folder, as declared
PLOTS = "report"


@dataclass
class ReportArgs(Options):
    run_dir: str = field(metadata={"help": "A run folder (runs/<name>) with one sub-folder per stage."})
    examples: int = field(
        default=4, metadata={"help": "How many clusters to show next to their distillation.", "range": "[0, inf)"}
    )
    title: str | None = field(default=None, metadata={"help": "Report title (default: the run folder name)."})


# -- reading --------------------------------------------------------------------------------------
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


# -- plots ----------------------------------------------------------------------------------------
def plot_counts(stages: list[StageSummary], path: Path) -> bool:
    stages = [s for s in stages if s.rows is not None]
    if not stages:
        return False
    with figure(path, (8, 3.6)) as (fig, ax):
        names = [s.name for s in stages]
        bars = ax.bar(names, [s.rows for s in stages], color="#4C72B0", label="rows out")
        ax.bar(names, [s.rejected for s in stages], bottom=[s.rows for s in stages], color="#DD8452", label="rejected")
        ax.bar_label(bars, padding=2, fontsize=8)
        ax.set_ylabel("rows")
        ax.set_title("Rows per stage")
        ax.legend(fontsize=8)
    return True


def plot_scores(before: np.ndarray, after: np.ndarray, path: Path, thresholds: tuple[Any, Any]) -> bool:
    if not before.size and not after.size:
        return False
    with figure(path, (9, 3.4), ncols=2) as (fig, axes):
        bins = np.arange(-0.5, 6.5, 1.0)
        for ax, values, title, thr, color in (
            (axes[0], before, "Pool (rate)", thresholds[0], "#4C72B0"),
            (axes[1], after, "Distilled (rerate)", thresholds[1], "#55A868"),
        ):
            ok = values[~np.isnan(values)] if values.size else values
            ax.hist(ok, bins=bins, color=color, rwidth=0.85)
            failed = int(values.size - ok.size)
            ax.set_title(f"{title}: n={ok.size}" + (f", {failed} unscored" if failed else ""))
            ax.set_xlabel("score (0-5)")
            ax.set_xticks(range(6))
            if thr is not None:
                ax.axvline(thr - 0.5, color="#C44E52", linestyle="--", label=f"threshold {thr}")
                ax.legend(fontsize=8)
        axes[0].set_ylabel("rows")
    return True


def plot_hist(values: np.ndarray, path: Path, title: str, xlabel: str, discrete: bool = False) -> bool:
    if not values.size:
        return False
    with figure(path, (6, 3.2)) as (fig, ax):
        if discrete:
            bins = np.arange(values.min() - 0.5, values.max() + 1.5, 1.0)
            ax.hist(values, bins=bins, color="#8172B2", rwidth=0.85)
        else:
            ax.hist(values, bins=min(30, max(5, values.size // 3)), color="#8172B2")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
    return True


def plot_time(stages: list[StageSummary], path: Path) -> bool:
    timed = [s for s in stages if s.seconds is not None]
    if not timed:
        return False
    with figure(path, (8, 3.2)) as (fig, ax):
        bars = ax.bar([s.name for s in timed], [s.seconds for s in timed], color="#937860")
        ax.bar_label(bars, labels=[f"{s.seconds:.1f}s" for s in timed], padding=2, fontsize=8)
        ax.set_ylabel("seconds (last execution)")
        ax.set_title("Time per stage")
    return True


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


# -- rendering ------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _stage_rows(stages: list[StageSummary]) -> list[list[str]]:
    rows = []
    for s in stages:
        splits = ", ".join(f"{k} {v}" for k, v in s.splits.items()) or "-"
        cost = None if s.cost_usd is None else f"${s.cost_usd:.4f}"
        mode = ((s.manifest or {}).get("usage") or {}).get("mode")
        if cost is not None and mode:  # sync or batch: the same tokens cost half in a batch
            cost += f" ({mode})"
        rows.append(
            [
                s.name,
                _fmt(s.rows),
                splits,
                _fmt(s.rejected),
                _fmt(s.seconds),
                _fmt(s.tokens),
                _fmt(cost),
                "done" if s.manifest else "incomplete",
            ]
        )
    return rows


STAGE_HEADER = ["stage", "rows out", "splits", "rejected", "seconds", "tokens", "cost", "state"]


# One template renders both forms: ``html`` switches markup and escaping, the content is shared.
TEMPLATE = r"""
{%- macro table(header, rows) -%}
{%- if html -%}
<table><thead><tr>{% for h in header %}<th>{{ h|e }}</th>{% endfor %}</tr></thead><tbody>
{%- for r in rows %}<tr>{% for c in r %}<td>{{ c|e }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{%- else -%}
| {{ header|join(" | ") }} |
|{% for h in header %}---|{% endfor %}
{% for r in rows %}| {% for c in r %}{{ c|cell }}{{ " | " if not loop.last }}{% endfor %} |
{% endfor %}
{%- endif -%}
{%- endmacro -%}
{%- macro pair(p, c, limit) -%}
{%- if html -%}<div class='m'><b>Q:</b> {{ p|short(limit)|e }}<br><b>A:</b> {{ c|short(limit)|e }}</div>
{%- else -%}**Q:** {{ p|short(limit)|cell }}<br>**A:** {{ c|short(limit)|cell }}{%- endif -%}
{%- endmacro -%}
{%- macro example(ex) -%}
{%- set score = "" if ex.score is none else ", rerate score %.0f"|format(ex.score) -%}
{%- if html -%}
<h4>Cluster {{ ex.cluster_id }} ({{ ex.members|length }} members): {{ ex.status|e }}{{ score }}</h4>
<div class='pair'><div>{% for p, c in ex.members %}{{ pair(p, c, 300) }}{% endfor %}</div><div>
{%- if ex.prompt is not none %}{{ pair(ex.prompt, ex.completion or "", 100000) }}
{%- if ex.think %}<details><summary>reasoning</summary><pre>{{ ex.think|e }}</pre></details>{% endif %}
{%- else %}<i>no distilled row</i>{% endif %}</div></div>
{%- else -%}
#### Cluster {{ ex.cluster_id }} ({{ ex.members|length }} members): {{ ex.status|cell }}{{ score }}

| members | distilled |
|---|---|
| {% for p, c in ex.members %}{{ pair(p, c, 300) }}{{ "<br><br>" if not loop.last }}{% endfor %} | {% if ex.prompt is not none %}{{ pair(ex.prompt, ex.completion or "", 600) }}{% else %}*(no distilled row)*{% endif %} |
{%- endif -%}
{%- endmacro -%}
{%- if html -%}
<!doctype html><html><head><meta charset='utf-8'><title>{{ title|e }}</title><style>{{ css }}</style></head><body>
<h1>{{ title|e }}</h1><p>{{ headline|e }}</p>
<h2>Stages</h2>{{ table(stage_header, stage_rows) }}
{%- if reason_rows %}<h2>Rejected rows by reason</h2>{{ table(["stage", "reason", "rows"], reason_rows) }}{% endif %}
<h2>Plots</h2>{% for file, caption in plots %}<h3>{{ caption|e }}</h3><img alt='{{ caption|e }}' src='data:image/png;base64,{{ images[file] }}'>{% endfor %}
{%- if examples %}<h2>Example clusters and their distillations</h2>{% for ex in examples %}{{ example(ex) }}{% endfor %}{% endif %}
</body></html>
{%- else -%}
# {{ title }}

{{ headline }}

## Stages

{{ table(stage_header, stage_rows) }}
{% if reason_rows %}
## Rejected rows by reason

{{ table(["stage", "reason", "rows"], reason_rows) }}
{% endif %}
## Plots

{% for file, caption in plots %}![{{ caption }}]({{ plots_dir }}/{{ file }})

{% endfor -%}
{% if examples %}## Example clusters and their distillations

{% for ex in examples %}{{ example(ex) }}

{% endfor %}{% endif -%}
{%- endif -%}
"""


def _cell(text: Any) -> str:
    """A markdown table cell: tags shown as text, pipes escaped, line breaks kept as <br>."""
    s = str(text).replace("<br>", "\0").replace("<", "&lt;").replace(">", "&gt;").replace("\0", "<br>")
    return s.replace("|", "\\|").replace("\n", "<br>")


def render(html_form: bool, **context: Any) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=False, keep_trailing_newline=True)
    env.filters.update(cell=_cell, short=_short)
    return env.from_string(TEMPLATE).render(html=html_form, **context)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;font-size:14px}th{background:#f3f3f3}img{max-width:100%}.pair{display:grid;
grid-template-columns:1fr 1fr;gap:1em}.m{background:#f8f8f8;border-left:3px solid #4C72B0;padding:6px;
margin:4px 0;font-size:13px}pre{white-space:pre-wrap;font-size:12px}"""


def report(args: ReportArgs, executor: Executor | None = None) -> dict[str, Any]:
    """Write ``report.html`` and ``report.md`` into the run folder; return the numbers shown."""
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise LmmixupError(f"{run_dir}: no such run folder")
    stages = summarize(run_dir)
    if not stages:
        raise LmmixupError(f"{run_dir}: no stage outputs (expected sub-folders such as ingest/, rate/)")
    plots_dir = run_dir / PLOTS
    plots_dir.mkdir(exist_ok=True)
    title = args.title or f"lmmixup run: {run_dir.name}"

    before = scores(read_table(run_dir / "rate", columns=[RATING]))
    after = scores(read_table(run_dir / "rerate", columns=[RATING]))
    m_split, m_filter = read_manifest(run_dir / "split") or {}, read_manifest(run_dir / "filter") or {}
    thresholds = (m_split.get("params", {}).get("threshold"), m_filter.get("params", {}).get("min_score"))
    clusters = read_table(run_dir / "cluster", columns=[CLUSTER_ID])
    sizes = (
        np.array(list(Counter(clusters.column(CLUSTER_ID).to_pylist()).values()))
        if clusters is not None and CLUSTER_ID in clusters.column_names
        else np.zeros(0)
    )
    lt = read_table(run_dir / "longtail", columns=[LONG_TAIL])
    long_tail = (
        np.asarray(lt.column(LONG_TAIL).to_numpy(zero_copy_only=False), dtype=float)
        if lt is not None and LONG_TAIL in lt.column_names
        else np.zeros(0)
    )

    plots: list[tuple[str, str, bool]] = [
        ("counts.png", "Rows per stage", plot_counts(stages, plots_dir / "counts.png")),
        ("scores.png", "Scores before and after", plot_scores(before, after, plots_dir / "scores.png", thresholds)),
        (
            "cluster_sizes.png",
            "Cluster sizes",
            plot_hist(
                sizes, plots_dir / "cluster_sizes.png", f"Cluster sizes ({sizes.size} clusters)", "members", True
            ),
        ),
        (
            "long_tail.png",
            "Long-tail scores",
            plot_hist(
                long_tail[~np.isnan(long_tail)],
                plots_dir / "long_tail.png",
                "Long-tail score of distilled rows",
                "long_tail",
            ),
        ),
        ("time.png", "Time per stage", plot_time(stages, plots_dir / "time.png")),
    ]
    plots = [p for p in plots if p[2]]
    examples = collect_examples(run_dir, args.examples)
    reasons = rejection_reasons(run_dir)
    total_s = sum(s.seconds or 0 for s in stages)
    total_usd = sum(s.cost_usd or 0 for s in stages)
    mix = next((s for s in stages if s.name == "mix"), None)

    headline = (
        f"{stages[0].rows or 0} pool rows in, {mix.rows if mix and mix.rows is not None else '-'} rows in "
        f"the final mix; {total_s:.0f} s of stage time; ${total_usd:.4f} of API cost."
    )
    reason_rows = [[name, k, str(v)] for name, c in reasons.items() for k, v in c.most_common()]
    partial = {s.name: why for s in stages if (why := input_status(run_dir / s.name))}
    if partial:
        headline += " PARTIAL: " + "; ".join(f"{name}: {why}" for name, why in partial.items()) + "."

    context = {
        "title": title,
        "headline": headline,
        "stage_header": STAGE_HEADER,
        "stage_rows": _stage_rows(stages),
        "reason_rows": reason_rows,
        "plots": [(f, t) for f, t, _ in plots],
        "plots_dir": PLOTS,
        "examples": examples,
        "css": _CSS,
    }
    (run_dir / "report.md").write_text(render(False, **context), encoding="utf-8")
    images = {f: base64.b64encode((plots_dir / f).read_bytes()).decode() for f, _, _ in plots}
    (run_dir / "report.html").write_text(render(True, images=images, **context), encoding="utf-8")
    logger.info("report: %s (%d plots, %d examples)", run_dir / "report.html", len(plots), len(examples))
    return {
        "stages": {s.name: {"rows": s.rows, "rejected": s.rejected, "seconds": s.seconds} for s in stages},
        "plots": [f for f, _, _ in plots],
        "examples": len(examples),
        "partial_stages": partial,
        "scores_before": before.tolist(),
        "scores_after": after.tolist(),
    }
