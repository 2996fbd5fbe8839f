"""``lmmixup judge-report``: how far two ratings of the same rows agree (two judges, or a judge and a
human-labelled subset), and how much a judge's score follows the answer's length.

Reads any pool file or rated stage folder with ``id`` and ``rating.score``; rows are matched by id.
Writes ``judge_report.json`` (:func:`lmmixup_hf.judge.agreement.agreement` plus the matching
counts and the length bias) and ``judge_report.png`` (the confusion matrix and both histograms),
and prints a table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

from lmmixup_hf.data.io import read_pool, write_json
from lmmixup_hf.data.quality import rating_scores
from lmmixup_hf.data.schema import COMPLETION, HIGH_QUALITY_THRESHOLD, ID, LmmixupError
from lmmixup_hf.judge.agreement import K, agreement, spearman
from lmmixup_hf.options import Options
from lmmixup_hf.pipeline.workflow import check_out_dir
from lmmixup_hf.plotting import figure

logger = logging.getLogger(__name__)

REPORT = "judge_report.json"


@dataclass
class JudgeReportArgs(Options):
    ratings: str = field(
        metadata={"help": "Rated rows (pool file or rated stage folder with `id` and `rating.score`)."}
    )
    against: str = field(metadata={"help": "A second rating of the same ids (another judge, or human labels)."})
    out: str = field(metadata={"help": "Output folder: judge_report.json and judge_report.png."})
    threshold: int = field(
        default=HIGH_QUALITY_THRESHOLD,
        metadata={"help": "High quality means score (0-5) >= this, as in `lmmixup split`.", "range": "[0, 5]"},
    )
    judge_model: str | None = field(
        default=None,
        metadata={"help": "With --repeat: the judge to ask again about rows of --ratings (self-consistency)."},
    )
    repeat: int = field(
        default=0, metadata={"help": "Rows of --ratings to re-ask the judge about (0: none).", "range": "[0, inf)"}
    )
    engine: Literal["openai", "local"] = field(default="openai", metadata={"help": "Judge engine for --repeat."})
    base_url: str | None = field(default=None, metadata={"help": "Endpoint URL (default: $OPENAI_BASE_URL)."})
    api_key: str | None = field(default=None, metadata={"help": "API key (default: $OPENAI_API_KEY). Never written."})
    rubric: str = field(default="general", metadata={"help": "The rubric the ratings were made with (see `rate`)."})
    fields: str = field(default="prompt,completion", metadata={"help": "Columns the judge sees (see `rate`)."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature of the re-asked judge.", "range": "[0, inf)"}
    )
    seed: int = field(default=0, metadata={"help": "Which rows are re-asked."})


def _scores(path: str, ds: Dataset | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, scores, completion lengths)`` of a rated pool; NaN where a row has no score."""
    ds = read_pool(path) if ds is None else ds
    try:
        scores = rating_scores(ds)
    except LmmixupError as e:
        raise LmmixupError(f"{path}: {e}") from None
    bad = ~np.isnan(scores) & ((scores < 0) | (scores > K - 1) | (scores != np.round(scores)))
    if bad.any():
        raise LmmixupError(
            f"{path}: row {int(np.argmax(bad)) + 1}: rating.score {scores[bad][0]:g} is not a score 0-{K - 1}"
        )
    table = ds.select_columns([c for c in (ID, COMPLETION) if c in ds.column_names]).with_format("arrow")[: len(ds)]
    lengths = (
        pc.utf8_length(table.column(COMPLETION)).to_numpy(zero_copy_only=False).astype(np.float64)
        if COMPLETION in table.column_names
        else np.full(len(ds), np.nan)
    )
    return np.asarray(table.column(ID).to_pylist(), dtype=object), scores, lengths


def _length_bias(scores: np.ndarray, lengths: np.ndarray) -> float | None:
    ok = ~np.isnan(scores) & ~np.isnan(lengths)
    rho = spearman(scores[ok], lengths[ok]) if ok.sum() > 1 else float("nan")
    return None if np.isnan(rho) else round(rho, 4)


def judge_report(args: JudgeReportArgs) -> str:
    """Compare the two ratings, write the JSON and the plot, print the table; return the JSON's path."""
    out = check_out_dir(args.out)
    if args.repeat and not args.judge_model:
        raise LmmixupError("--repeat needs --judge_model: the judge to ask again")
    rated = read_pool(args.ratings)
    ids_a, a, len_a = _scores(args.ratings, rated)
    ids_b, b, len_b = _scores(args.against)
    common, ia, ib = np.intersect1d(ids_a.astype(str), ids_b.astype(str), return_indices=True)
    if not len(common):
        raise LmmixupError(f"{args.ratings} and {args.against} share no `id`: nothing to compare")
    both = ~np.isnan(a[ia]) & ~np.isnan(b[ib])
    sa, sb = a[ia][both].astype(np.int64), b[ib][both].astype(np.int64)
    if not len(sa):
        raise LmmixupError(f"no id has a score in both {args.ratings} and {args.against}")
    report: dict[str, Any] = {
        "ratings": args.ratings,
        "against": args.against,
        **_rounded(agreement(sa, sb, args.threshold)),
        "ids_in_both": int(len(common)),
        "unscored_in_both": int((~both).sum()),
        "only_in_ratings": int(len(ids_a) - len(common)),
        "only_in_against": int(len(ids_b) - len(common)),
        # Spearman of score vs completion length over each file's own scored rows: > 0 = longer answers score higher
        "length_bias": {"ratings": _length_bias(a, len_a), "against": _length_bias(b, len_b)},
    }
    if args.repeat:
        report["self_consistency"] = self_consistency(args, rated, a)
    write_json(out / REPORT, report)
    _plot(out / "judge_report.png", report, sa, sb)
    print(render(report))
    return str(out / REPORT)


def self_consistency(args: JudgeReportArgs, ds: Dataset, scores: np.ndarray) -> dict[str, Any]:
    """Ask the judge again about ``args.repeat`` scored rows of ``ds`` (no cache: fresh replies, one
    reply per row) and compare with the scores they have; the parse-failure rate is the share of
    replies that carried no score."""
    import os

    from lmmixup_hf.judge.judges import make_judge
    from lmmixup_hf.stages.rate import judge_items

    scored = np.flatnonzero(~np.isnan(scores))
    rows = np.sort(np.random.default_rng(args.seed).choice(scored, min(args.repeat, len(scored)), replace=False))
    fields = [f.strip() for f in args.fields.split(",") if f.strip()]
    items, unratable = judge_items(ds.select(rows), fields, args.rubric)
    order = sorted(items)
    judge = make_judge(
        args.engine,
        args.judge_model,
        base_url=args.base_url or os.environ.get("OPENAI_BASE_URL"),
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        cache_dir=None,
        temperature=args.temperature,
    )
    if hasattr(judge, "parse_retries"):
        judge.parse_retries = 0  # one reply per row: the rate of unusable replies is what is measured
    ratings = judge.rate_many([items[i] for i in order], desc="re-ask", show_progress=False)
    unparsed = sum(1 for r in ratings if not r.ok and str(r.error or "").startswith("unparseable"))
    ok = [(i, r.score) for i, r in zip(order, ratings) if r.ok]
    before = scores[rows[[i for i, _ in ok]]].astype(np.int64)
    again = np.asarray([s for _, s in ok], np.int64)
    figures = _rounded(agreement(before, again, args.threshold)) if len(ok) else {"n": 0}
    return {
        "judge": args.judge_model,
        "asked": len(order),
        "not_ratable": len(unratable),
        "scored": len(ok),
        "parse_failures": unparsed,
        "parse_failure_rate": round(unparsed / len(order), 4) if order else None,
        "other_failures": len(order) - len(ok) - unparsed,
        **{k: figures.get(k) for k in ("exact_agreement", "within_one", "quadratic_kappa", "high_low_agreement")},
    }


def _round(v: Any) -> Any:
    """4 decimals for a float, None for NaN (JSON has no NaN); lists element by element."""
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, float):
        return None if np.isnan(v) else round(v, 4)
    return v


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _round(v) for k, v in d.items()}


def render(report: dict[str, Any]) -> str:
    """The readable table: the headline figures, then the confusion matrix."""
    f = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    t = report["threshold"]
    rows = [
        ("rows compared (ids in both, scored in both)", report["n"]),
        ("exact agreement", report["exact_agreement"]),
        ("within one point", report["within_one"]),
        ("quadratic-weighted kappa", report["quadratic_kappa"]),
        (f"high (>= {t}) / low agreement", report["high_low_agreement"]),
        (f"high (>= {t}) / low kappa", report["high_low_kappa"]),
        ("high share: ratings / against", " / ".join(f(x) for x in report["high_share"])),
        ("mean score: ratings / against", " / ".join(f(x) for x in report["mean_score"])),
        (
            "length bias (Spearman score~length): ratings / against",
            " / ".join(f(x) for x in report["length_bias"].values()),
        ),
    ]
    sc = report.get("self_consistency")
    if sc:
        rows += [
            (f"self-consistency ({sc['scored']} of {sc['asked']} re-asked rows scored): exact", sc["exact_agreement"]),
            ("self-consistency: quadratic kappa", sc["quadratic_kappa"]),
            ("parse-failure rate (replies with no score)", sc["parse_failure_rate"]),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"judge report: {report['ratings']} vs {report['against']}", ""]
    lines += [f"  {k:<{width}}  {f(v)}" for k, v in rows]
    lines += ["", "  confusion (rows: ratings, columns: against)", "       " + "".join(f"{j:>8}" for j in range(K))]
    lines += [f"  {i:>5}" + "".join(f"{x:>8}" for x in row) for i, row in enumerate(report["confusion"])]
    return "\n".join(lines)


def _plot(path: Path, report: dict[str, Any], a: np.ndarray, b: np.ndarray) -> None:
    c = np.asarray(report["confusion"])
    with figure(path, (11, 4.2), ncols=2) as (fig, (ax0, ax1)):
        ax0.imshow(c, cmap="Blues")
        for (i, j), v in np.ndenumerate(c):
            ax0.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > c.max() / 2 else "black")
        ax0.set_xlabel("against: score")
        ax0.set_ylabel("ratings: score")
        ax0.set_title(f"quadratic kappa {report['quadratic_kappa']}, exact {report['exact_agreement']}")
        x = np.arange(K)
        ax1.bar(x - 0.2, np.bincount(a, minlength=K), 0.4, label="ratings")
        ax1.bar(x + 0.2, np.bincount(b, minlength=K), 0.4, label="against")
        ax1.axvline(report["threshold"] - 0.5, color="grey", linestyle="--", linewidth=1)
        ax1.set_xlabel("score (0-5)")
        ax1.set_ylabel("rows")
        ax1.set_title(f"n = {report['n']}")
        ax1.legend(fontsize="small")
