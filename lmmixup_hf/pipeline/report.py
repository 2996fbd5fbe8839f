"""``lmmixup report``: one page that says what a pipeline run did, from what the stages wrote.

Everything comes from the stage folders under ``runs/<name>/`` (``manifest.json``, ``data/``,
splits, ``rejected.jsonl``), so the report can be rebuilt at any time and shows a partial run as
far as it got. It writes ``report.html`` (self-contained: the plots are embedded) and
``report.md`` (the plots as files under ``report/``).
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmmixup_hf.data.schema import CLUSTER_ID, LONG_TAIL, RATING, LmmixupError
from lmmixup_hf.execution.base import Executor
from lmmixup_hf.options import Options
from lmmixup_hf.pipeline.report_collect import (
    STAGES,
    Example,
    StageSummary,
    _short,
    collect_examples,
    count_rows,
    find_costs,
    read_manifest,
    read_table,
    rejection_reasons,
    scores,
    summarize,
)
from lmmixup_hf.pipeline.report_judge import (
    JUDGE_REPORT_DIR,
    RATING_HEADER,
    collect_judge,
    fmt,
    judge_images,
    judge_tables,
)
from lmmixup_hf.pipeline.report_plots import plot_counts, plot_hist, plot_scores, plot_time
from lmmixup_hf.pipeline.workflow import input_status

__all__ = [
    "STAGES",
    "Example",
    "ReportArgs",
    "StageSummary",
    "collect_examples",
    "count_rows",
    "find_costs",
    "plot_counts",
    "plot_hist",
    "plot_scores",
    "plot_time",
    "read_manifest",
    "read_table",
    "rejection_reasons",
    "render",
    "report",
    "scores",
    "summarize",
]

logger = logging.getLogger(__name__)

PLOTS = "report"
TEMPLATE = Path(__file__).with_name("report.jinja")  # one template renders both forms


@dataclass
class ReportArgs(Options):
    run_dir: str = field(metadata={"help": "A run folder (runs/<name>) with one sub-folder per stage."})
    examples: int = field(
        default=4, metadata={"help": "How many clusters to show next to their distillation.", "range": "[0, inf)"}
    )
    title: str | None = field(default=None, metadata={"help": "Report title (default: the run folder name)."})
    judge_report: str | None = field(
        default=None,
        metadata={
            "help": "A `lmmixup judge-report` output (judge_report.json or its folder) to show in the judge "
            f"section (default: <run_dir>/{JUDGE_REPORT_DIR}/ when there)."
        },
    )


# -- rendering ------------------------------------------------------------------------------------
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
                fmt(s.rows, 1),
                splits,
                fmt(s.rejected, 1),
                fmt(s.seconds, 1),
                fmt(s.tokens, 1),
                fmt(cost, 1),
                "done" if s.manifest else "incomplete",
            ]
        )
    return rows


STAGE_HEADER = ["stage", "rows out", "splits", "rejected", "seconds", "tokens", "cost", "state"]


def _cell(text: Any) -> Any:
    """A markdown table cell: HTML-escaped as the page is, then pipes escaped and line breaks kept
    as ``<br>`` (a table row is one line)."""
    from markupsafe import Markup, escape

    return Markup(str(escape(text)).replace("|", "\\|").replace("\n", "<br>"))


def render(html_form: bool, **context: Any) -> str:
    """The page (``html_form``) or the markdown report from the packaged template, autoescaped: a row's
    text never becomes markup in either form."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True, keep_trailing_newline=True
    )
    env.filters.update(cell=_cell, short=_short)
    return env.get_template(TEMPLATE.name).render(html=html_form, **context)


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
    judge = collect_judge(run_dir, args.judge_report)
    judge_plots = judge_images(run_dir, judge, plots_dir)
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
        "judge": judge_tables(judge),
        "judge_plots": judge_plots,
        "rating_header": RATING_HEADER,
        "examples": examples,
        "css": _CSS,
    }
    (run_dir / "report.md").write_text(render(False, **context), encoding="utf-8")
    shown = [f for f, _, _ in plots] + judge_plots
    images = {f: base64.b64encode((plots_dir / f).read_bytes()).decode() for f in shown}
    (run_dir / "report.html").write_text(render(True, images=images, **context), encoding="utf-8")
    logger.info("report: %s (%d plots, %d examples)", run_dir / "report.html", len(plots), len(examples))
    return {
        "stages": {s.name: {"rows": s.rows, "rejected": s.rejected, "seconds": s.seconds} for s in stages},
        "plots": [f for f, _, _ in plots],
        "examples": len(examples),
        "partial_stages": partial,
        "scores_before": before.tolist(),
        "scores_after": after.tolist(),
        "judge": judge,
    }
