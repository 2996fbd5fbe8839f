"""The report's judge section: who rated the rows and how well, from what a run already holds.

Three sources, each shown only when present: the judge stages' manifests (``rate``, ``rerate``:
engine, model, rubric, rows rated and failed, high-quality share), the ``curate`` stage's
``diagnosis.json`` (the judge's transition matrix T, the clean prior against the rated scores, rows
flagged and changed) and a ``judge_report.json`` written by ``lmmixup judge-report`` (by default
``<run>/judge_report/``: agreement with a second rating, length bias, self-consistency).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.pipeline.report_collect import read_manifest

JUDGE_STAGES = ("rate", "rerate")  # the stages whose manifest names a judge
CURATE = "curate"
DIAGNOSIS = "diagnosis.json"  # as `lmmixup curate` writes it
JUDGE_REPORT_DIR = "judge_report"  # where the report looks for `lmmixup judge-report --out` by default
JUDGE_REPORT = "judge_report.json"

RATING_HEADER = ["stage", "engine", "model", "rubric", "rows", "rated", "failed", "mean score", "high share"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def fmt(x: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for nothing, floats to ``digits`` places."""
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def judge_ratings(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per judge stage that ran with a judge: who judged, rows rated and failed, score summary."""
    out = {}
    for name in JUDGE_STAGES:
        m = read_manifest(run_dir / name) or {}
        judge, summary, counts = m.get("judge"), m.get("summary") or {}, m.get("counts") or {}
        if not judge:
            continue
        rows = counts.get("rows")
        failed = counts.get("failed", summary.get("failed"))
        out[name] = {
            **{k: judge.get(k) for k in ("engine", "model", "rubric", "rubric_version")},
            "rows": rows,
            "rated": counts.get("rated", summary.get("n")),
            "failed": failed,
            "failure_rate": round(failed / rows, 4) if rows and failed is not None else None,
            "mean_score": summary.get("mean_score"),
            "high_share": summary.get("high_share"),
            "threshold": (m.get("params") or {}).get("threshold"),
        }
    return out


def find_judge_report(run_dir: Path, path: str | None = None) -> Path | None:
    """``path`` (a ``judge_report.json`` or the folder holding one), else ``<run>/judge_report/``."""
    p = Path(path) if path else run_dir / JUDGE_REPORT_DIR
    p = p / JUDGE_REPORT if p.is_dir() else p
    return p if p.is_file() else None


def collect_judge(run_dir: Path, judge_report: str | None = None) -> dict[str, Any]:
    """The section's numbers (JSON-ready); empty when the run holds none of them."""
    out: dict[str, Any] = {}
    if ratings := judge_ratings(run_dir):
        out["ratings"] = ratings
    diag = run_dir / CURATE / DIAGNOSIS
    if diag.is_file():
        d = json.loads(diag.read_text())
        out["curation"] = {
            k: d.get(k)
            for k in ("rows", "scored", "unscored", "flagged", "changed", "T", "p_clean", "p_rated")
            + ("histogram_raw", "histogram_curated")
        }
    if (rep := find_judge_report(run_dir, judge_report)) is not None:
        out["agreement"] = {"file": str(rep), **json.loads(rep.read_text())}
    elif judge_report:
        raise LmmixupError(f"{judge_report}: no such file, nor a folder with {JUDGE_REPORT}")
    return out


def judge_images(run_dir: Path, judge: dict[str, Any], plots_dir: Path) -> list[str]:
    """The curate and judge-report plots that exist, copied next to the report's own plots."""
    found = {}
    if "curation" in judge:
        found["curation.png"] = run_dir / CURATE / "summary.png"
    if "agreement" in judge:
        found["judge_report.png"] = Path(judge["agreement"]["file"]).with_suffix(".png")
    out = []
    for name, src in found.items():
        if src.is_file():
            shutil.copyfile(src, plots_dir / name)
            out.append(name)
    return out


def judge_tables(judge: dict[str, Any]) -> dict[str, Any]:
    """The section as the template shows it: header/rows tables, formatted; absent parts left out."""
    out: dict[str, Any] = {}
    if ratings := judge.get("ratings"):
        out["ratings"] = [
            [
                name,
                fmt(r["engine"]),
                fmt(r["model"]),
                fmt(r["rubric"]) + (f" ({r['rubric_version']})" if r.get("rubric_version") else ""),
                fmt(r["rows"]),
                fmt(r["rated"]),
                f"{fmt(r['failed'])} ({_pct(r['failure_rate'])})" if r["failure_rate"] is not None else "-",
                fmt(r["mean_score"], 2),
                _pct(r["high_share"]) + (f" (score >= {r['threshold']})" if r.get("threshold") is not None else ""),
            ]
            for name, r in ratings.items()
        ]
    if cur := judge.get("curation"):
        k = len(cur["T"] or [])
        out["curation_counts"] = [
            ["rows", fmt(cur["rows"])],
            ["scored", fmt(cur["scored"])],
            ["without a score (passed through)", fmt(cur["unscored"])],
            ["flagged (judge score more likely wrong than right)", fmt(cur["flagged"])],
            ["changed", fmt(cur["changed"])],
        ]
        out["T_header"] = ["true \\ judge", *map(str, range(k))]
        out["T"] = [[str(i), *(f"{v:.2f}" for v in row)] for i, row in enumerate(cur["T"] or [])]
        out["prior_header"] = ["score", "clean prior", "rated", "rows (judge)", "rows (curated)"]
        hist_raw, hist_cur = cur.get("histogram_raw") or [None] * k, cur.get("histogram_curated") or [None] * k
        out["prior"] = [
            [str(s), _pct(cur["p_clean"][s]), _pct(cur["p_rated"][s]), fmt(hist_raw[s]), fmt(hist_cur[s])]
            for s in range(k)
        ]
    if a := judge.get("agreement"):
        t = a.get("threshold")
        bias = a.get("length_bias") or {}
        rows = [
            ["ratings", fmt(a.get("ratings"))],
            ["against", fmt(a.get("against"))],
            ["rows compared (n)", fmt(a.get("n"))],
            ["exact agreement", fmt(a.get("exact_agreement"))],
            ["within one point", fmt(a.get("within_one"))],
            ["quadratic-weighted kappa", fmt(a.get("quadratic_kappa"))],
            [f"high (>= {t}) / low agreement", fmt(a.get("high_low_agreement"))],
            [f"high (>= {t}) / low kappa", fmt(a.get("high_low_kappa"))],
            ["length bias (Spearman score~length): ratings / against", " / ".join(fmt(v) for v in bias.values())],
        ]
        if sc := a.get("self_consistency"):
            rows += [
                [
                    f"self-consistency: exact ({fmt(sc.get('scored'))} of {fmt(sc.get('asked'))} re-asked rows)",
                    fmt(sc.get("exact_agreement")),
                ],
                ["self-consistency: quadratic kappa", fmt(sc.get("quadratic_kappa"))],
                ["parse-failure rate (replies with no score)", _pct(sc.get("parse_failure_rate"))],
            ]
        out["agreement"] = rows
    return out
