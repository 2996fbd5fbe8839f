"""The run report renders from the stage folders a run leaves behind, and says what happened."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import pytest
from datasets import Dataset

from lmmixup_hf.data.schema import LmmixupError, compress_score
from lmmixup_hf.pipeline.report import ReportArgs, find_costs, report
from lmmixup_hf.pipeline.split import FilterArgs, SplitArgs, filter_rated, split_rated
from lmmixup_hf.pipeline.workflow import StageRun

PNG = b"\x89PNG\r\n\x1a\n"


def _rating(raw: int) -> dict:
    return {"raw": raw, "score": compress_score(raw), "dims": {"overall": raw}, "judge": "test"}


def _rows(n: int, prefix: str, raws: list[int]) -> list[dict]:
    return [
        {
            "id": f"{prefix}{i}",
            "prompt": f"Question {prefix}{i}?",
            "completion": f"Answer {prefix}{i}.",
            "source": "dolly" if i % 2 else "alpaca",
            "task_type": "qa",
            "rating": _rating(raws[i % len(raws)]),
        }
        for i in range(n)
    ]


@pytest.fixture()
def finished_run(tmp_path):
    """A small run folder written through the same StageRun bookkeeping the stages use."""
    run_dir = tmp_path / "runs" / "toy"
    pool = _rows(12, "p", [9, 8, 5, 3, 6, 4])
    ing = StageRun("ingest", run_dir / "ingest", params={"input": "pool.jsonl"})
    ing.quarantine.add("pool.jsonl", 3, "completion", "empty")
    ing.finish(
        Dataset.from_list([{k: v for k, v in r.items() if k != "rating"} for r in pool]), counts={"rows_out": 12}
    )
    StageRun("rate", run_dir / "rate", params={"model": "judge"}).finish(
        Dataset.from_list(pool), counts={"rated": 12}, extra={"usage": {"total_tokens": 5400, "cost_usd": 0.0123}}
    )
    split_rated(SplitArgs(input=str(run_dir / "rate"), out=str(run_dir / "split"), threshold=4))
    low = [r for r in pool if r["rating"]["score"] < 4]
    clustered = [{**r, "cluster_id": i // 2} for i, r in enumerate(low)]
    StageRun("cluster", run_dir / "cluster").finish(Dataset.from_list(clustered), counts={"clusters": 4})
    distilled = [
        {
            "id": f"d{c}",
            "cluster_id": c,
            "member_ids": [r["id"] for r in clustered if r["cluster_id"] == c],
            "prompt": f"Fused question {c}?",
            "completion": f"Fused answer {c}.",
            "think": f"merge {c}",
            "output": f"Q: Fused question {c}?\nA: Fused answer {c}.",
            "source": "dolly",
            "task_type": "qa",
        }
        for c in (0, 2)
    ]
    dist = StageRun("distill", run_dir / "distill")
    dist.quarantine.add(
        "cluster",
        None,
        "output",
        "unparseable output: no <answer> tag",
        json.dumps({"cluster_id": 1, "raw_response": "I cannot"}),
    )
    dist.finish(Dataset.from_list(distilled), counts={"distilled": 2})
    rerated = [{**d, "rating": _rating(9 if d["cluster_id"] == 0 else 5)} for d in distilled]
    StageRun("rerate", run_dir / "rerate").finish(Dataset.from_list(rerated), counts={"rated": 2})
    filter_rated(FilterArgs(input=str(run_dir / "rerate"), out=str(run_dir / "filter"), min_score=4))
    lt = [{**rerated[0], "long_tail": 0.42}]
    StageRun("longtail", run_dir / "longtail").finish(Dataset.from_list(lt), counts={"scored": 1})
    mix = [{"prompt": r["prompt"], "completion": r["completion"]} for r in pool[:3] + lt]
    StageRun("mix", run_dir / "mix").finish(Dataset.from_list(mix), counts={"rows_out": 4})
    return run_dir


def test_split_and_filter_keep_every_row(finished_run):
    split = json.loads((finished_run / "split" / "manifest.json").read_text())
    assert split["counts"]["high"] == 4 and split["counts"]["low"] == 8  # raws 9,8 -> score 5,4
    filt = json.loads((finished_run / "filter" / "manifest.json").read_text())
    assert filt["counts"] == {"rows_in": 2, "rows_out": 1, "below_threshold": 1, "unscored": 0, "rejected": 0}


def test_report_renders_plots_tables_and_examples(finished_run):
    info = report(ReportArgs(run_dir=str(finished_run), examples=3))
    assert info["plots"] == ["counts.png", "scores.png", "cluster_sizes.png", "long_tail.png", "time.png"]
    for name in info["plots"]:
        assert (finished_run / "report" / name).read_bytes().startswith(PNG)
    assert info["stages"]["rate"]["rows"] == 12 and info["stages"]["mix"]["rows"] == 4
    assert sorted(info["scores_before"]) == sorted(compress_score(r) for r in [9, 8, 5, 3, 6, 4] * 2)
    assert sorted(info["scores_after"]) == [1.0, 5.0]

    page = (finished_run / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5 and all(base64.b64decode(i).startswith(PNG) for i in images)  # self-contained
    assert "Fused question 0?" in page and "kept" in page and "below threshold" in page
    assert "unparseable output: no &lt;answer&gt; tag" in page  # cluster 1's rejection, shown honestly
    assert "$0.0123" in page and "5400" in page  # cost and tokens from the rate manifest

    md = (finished_run / "report.md").read_text()
    assert "![Cluster sizes](report/cluster_sizes.png)" in md
    assert "| ingest | 12 |" in md and "| empty | 1 |" in md
    assert "#### Cluster 0 (2 members): kept, rerate score 5" in md


def test_report_of_a_partial_run(finished_run):
    import shutil

    for stage in ("rerate", "filter", "longtail", "mix"):
        shutil.rmtree(finished_run / stage)
    info = report(ReportArgs(run_dir=str(finished_run)))
    assert "long_tail.png" not in info["plots"] and info["scores_after"] == []
    assert "mix" not in info["stages"]
    assert "rows in the final mix" in (finished_run / "report.md").read_text()


def test_report_cli_and_errors(finished_run, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lmmixup_hf.cli", "report", "--run_dir", str(finished_run)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (finished_run / "report.html").exists()
    r = subprocess.run(
        [sys.executable, "-m", "lmmixup_hf.cli", "report", "--run_dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no such run folder" in r.stderr


def test_find_costs_skips_params():
    m = {"params": {"max_tokens": 5}, "usage": {"prompt_tokens": 3, "cost_usd": 0.5}, "counts": {"rows": 2}}
    assert find_costs(m) == {"usage.prompt_tokens": 3.0, "usage.cost_usd": 0.5}


def test_report_escapes_row_text_in_both_forms():
    """Row text is data, never markup: the packaged template is autoescaped; markdown cells also
    escape pipes and keep line breaks inside the table row."""
    from lmmixup_hf.pipeline.report import Example, render

    ex = Example(7, [("<script>alert(1)</script> a|b", "line 1\nline 2")], "kept")
    context = {
        "title": "run <b>x</b>",
        "headline": "h & h",
        "stage_header": ["stage"],
        "stage_rows": [["<i>x</i>|y"]],
        "reason_rows": [],
        "plots": [],
        "plots_dir": "report",
        "examples": [ex],
        "css": "td{color:red}",
    }
    page, md = render(True, images={}, **context), render(False, **context)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>run &lt;b&gt;x&lt;/b&gt;</title>" in page and "<td>&lt;i&gt;x&lt;/i&gt;|y</td>" in page
    assert "<style>td{color:red}</style>" in page  # our own stylesheet is not escaped
    assert "<script>" not in md and "| &lt;i&gt;x&lt;/i&gt;\\|y |" in md
    assert "a\\|b<br>**A:** line 1 line 2" in md  # `short` folds whitespace; the pair's own <br> stays


@pytest.fixture()
def judged_run(finished_run, tmp_path):
    """The toy run plus what the judge section reads: a rate manifest naming its judge (one row
    failed), a curate stage (diagnosis, summary plot) and a `lmmixup judge-report` against a
    second rating in <run>/judge_report/."""
    import numpy as np

    from lmmixup_hf.data.io import write_json
    from lmmixup_hf.pipeline.curate import DIAGNOSIS, plot_summary
    from lmmixup_hf.pipeline.judge_report import JudgeReportArgs, judge_report
    from lmmixup_hf.pipeline.rate_summary import summarize
    from lmmixup_hf.stages.curate import Curation

    pool = _rows(12, "p", [9, 8, 5, 3, 6, 4])
    raw = np.array([r["rating"]["score"] for r in pool], float)
    high = raw[:11] >= 4
    summary = summarize(raw[:11].astype(int), np.array([r["source"] for r in pool[:11]]), high, [pool[11]["source"]])
    StageRun("rate", finished_run / "rate", params={"model": "judge", "threshold": 4}).finish(
        Dataset.from_list(pool[:11] + [{**pool[11], "rating": None}]),  # the judge failed on the last row
        counts={"rows": 12, "rated": 11, "failed": 1, "high": int(high.sum()), "low": int((~high).sum())},
        extra={
            "usage": {"total_tokens": 5400, "cost_usd": 0.0123},
            "judge": {"engine": "openai", "model": "judge-<x>", "rubric": "general", "rubric_version": "rubric-2"},
            "summary": summary["all"],
        },
    )
    raw[11] = np.nan  # the failed row has no score
    T = np.full((6, 6), 0.04) + np.eye(6) * 0.76
    curated = raw.copy()
    curated[[0, 3]] = [4, 2]
    result = Curation(curated, raw, np.where(curated != raw, 0.7, 0.1), T, np.full(6, 1 / 6), np.full(6, 1 / 6), 0.01)
    (finished_run / "curate").mkdir()
    write_json(finished_run / "curate" / DIAGNOSIS, result.diagnosis())
    plot_summary(finished_run / "curate" / "summary.png", result)
    StageRun("curate", finished_run / "curate").finish(Dataset.from_list(pool), counts={"changed": 2})

    other = [{**r, "rating": _rating(raw)} for r, raw in zip(pool, [9, 6, 3, 2, 5, 4] * 2, strict=True)]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    judge_report(
        JudgeReportArgs(
            ratings=str(finished_run / "rate"),
            against=str(tmp_path / "other.jsonl"),
            out=str(finished_run / "judge_report"),
        )
    )
    return finished_run


def test_report_shows_the_judge_section_when_the_run_has_it(judged_run):
    info = report(ReportArgs(run_dir=str(judged_run)))
    judge = info["judge"]
    rate = judge["ratings"]["rate"]
    assert (rate["model"], rate["rows"], rate["failed"], rate["failure_rate"]) == (
        "judge-<x>",
        12,
        1,
        round(1 / 12, 4),
    )
    diag = json.loads((judged_run / "curate" / "diagnosis.json").read_text())
    assert judge["curation"]["T"] == diag["T"] and (judge["curation"]["changed"], diag["changed"]) == (2, 2)
    assert judge["curation"]["unscored"] == 1
    agreement = json.loads((judged_run / "judge_report" / "judge_report.json").read_text())
    assert judge["agreement"]["quadratic_kappa"] == agreement["quadratic_kappa"] and agreement["n"] == 11

    page = (judged_run / "report.html").read_text()
    section = page[page.index("<h2>Judge</h2>") : page.index("<h2>Plots</h2>")]
    assert "judge-&lt;x&gt;" in section and "judge-<x>" not in page  # escaped like any row text
    assert "1 (8.3%)" in section  # failed rows and the failure rate
    assert f"{summary_share(judged_run):.1%} (score &gt;= 4)" in section  # the high-quality share
    assert "<td>without a score (passed through)</td><td>1</td>" in section
    assert "<td>changed</td><td>2</td>" in section and "<td>0.80</td>" in section  # T's diagonal
    assert f"<td>{agreement['quadratic_kappa']:.3f}</td>" in section
    assert f"<td>{agreement['high_low_kappa']:.3f}</td>" in section
    assert f"<td>{agreement['n']}</td>" in section
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", section)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG) for i in images)

    md = (judged_run / "report.md").read_text()
    assert "## Judge" in md and "### Score curation" in md and "### Agreement with a second rating" in md
    assert "![Score transition matrix T" in md and (judged_run / "report" / "curation.png").exists()
    assert f"| quadratic-weighted kappa | {agreement['quadratic_kappa']:.3f} |" in md
    assert "| rate | openai | judge-&lt;x&gt; | general (rubric-2) | 12 | 11 | 1 (8.3%) |" in md


def summary_share(run_dir) -> float:
    return json.loads((run_dir / "rate" / "manifest.json").read_text())["summary"]["high_share"]


def test_report_judge_section_parts_and_absence(judged_run, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.move(judged_run / "judge_report", moved)
    shutil.rmtree(judged_run / "curate")
    info = report(ReportArgs(run_dir=str(judged_run)))
    assert set(info["judge"]) == {"ratings"}  # only what is there
    page = (judged_run / "report.html").read_text()
    assert "<h2>Judge</h2>" in page and "Score curation" not in page and "Agreement" not in page

    rep = json.loads((moved / "judge_report.json").read_text())
    rep["self_consistency"] = {
        "asked": 8,
        "scored": 7,
        "exact_agreement": 0.7143,
        "quadratic_kappa": 0.9,
        "parse_failure_rate": 0.125,
    }  # what `judge-report --repeat 8` adds
    (moved / "judge_report.json").write_text(json.dumps(rep))
    info = report(ReportArgs(run_dir=str(judged_run), judge_report=str(moved)))  # a judge report kept elsewhere
    assert info["judge"]["agreement"]["file"] == str(moved / "judge_report.json")
    md = (judged_run / "report.md").read_text()
    assert "| self-consistency: exact (7 of 8 re-asked rows) | 0.714 |" in md
    assert "| parse-failure rate (replies with no score) | 12.5% |" in md
    with pytest.raises(LmmixupError, match="no such file"):
        report(ReportArgs(run_dir=str(judged_run), judge_report=str(tmp_path / "nope")))


def test_report_without_judge_data_has_no_judge_section(finished_run):
    info = report(ReportArgs(run_dir=str(finished_run)))
    assert info["judge"] == {}
    assert "Judge" not in (finished_run / "report.html").read_text()
    assert "Judge" not in (finished_run / "report.md").read_text()
    assert not (finished_run / "report" / "curation.png").exists()
