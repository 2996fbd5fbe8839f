"""``lmmixup eval-report``: lm-eval result JSONs -> the paper's downstream table (markdown, CSV, PNG).

Columns are MMLU, TruthfulQA (truth x info), GSM, BBH, TyDiQA (F1) and Avg, in percent. Avg is the
plain mean of the five; when one of them is missing the average is left empty, or the score counts
as 0 with ``--missing_as_zero`` (what the reference aggregation did). TruthfulQA MC2 and the MIXTURE
distillation metrics are added as extra columns when some result has them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.evaluation.metrics import openllm_average
from lmmixup_hf.options import Options

logger = logging.getLogger(__name__)

# column -> (task, metric key) candidates, first found wins: our tasks, then lm-eval's built-ins
BENCHMARKS: dict[str, list[tuple[str, str]]] = {
    "MMLU": [("mmlu_0shot", "acc,none"), ("mmlu", "acc,none")],
    "TruthfulQA": [("truthfulqa_judge", "truth_info,none")],
    "GSM": [
        ("gsm8k_8shot_cot_200", "exact_match,none"),
        ("gsm8k_cot", "exact_match,strict-match"),
        ("gsm8k", "exact_match,strict-match"),
    ],
    "BBH": [("bbh_3shot_cot_40", "score,none"), ("bbh_3shot_cot_40_t08", "score,none")],
    "TyDiQA": [("tydiqa_goldp_1shot", "f1,none")],
}
EXTRAS: dict[str, list[tuple[str, str]]] = {
    "TruthfulQA MC2": [("truthfulqa_mc2_6shot", "mc2,none"), ("truthfulqa_mc2", "acc,none")],
    "BBH greedy": [("bbh_3shot_cot_40_greedy", "score,none")],
    "TyDiQA greedy": [("tydiqa_goldp_1shot_greedy", "f1,none")],
    "MIXTURE format": [("mixture_distill", "format,none")],
    "MIXTURE alignment": [("mixture_distill", "alignment,none")],
    "MIXTURE quality": [("mixture_distill", "quality,none")],
    "MIXTURE judge": [("mixture_distill", "judge,none")],
}
AVG = "Avg"


@dataclass
class EvalReportArgs(Options):
    results: list[str] = field(
        metadata={"help": "lm-eval results_*.json files, or folders searched recursively for them", "nargs": "+"}
    )
    out: str = field(metadata={"help": "folder for eval_table.md, eval_table.csv and eval_chart.png"})
    missing_as_zero: bool = field(default=False, metadata={"help": "count a missing benchmark as 0 in Avg"})
    title: str = field(default="Downstream evaluation", metadata={"help": "chart title"})


def find_result_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("results*.json"))
            if not found:
                raise LmmixupError(f"{p}: no lm-eval results*.json files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise LmmixupError(f"{p}: no such file or folder")
    return files


def model_label(result: dict, file: Path) -> str:
    """The model a results file is about: the ``pretrained`` model's last path part (Hub id kept)."""
    name = result.get("model_name") or ""
    if not name:
        args = (result.get("config") or {}).get("model_args")
        if isinstance(args, dict):
            name = str(args.get("pretrained") or args.get("model") or "")
        elif isinstance(args, str):
            parts = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
            name = parts.get("pretrained") or parts.get("model") or ""
    if not name:
        return file.parent.name
    path = Path(name)
    local = path.is_absolute() or path.exists() or name.count("/") > 1  # a Hub id has one slash
    return path.name if local else name


def _value(results: dict, candidates: list[tuple[str, str]]) -> float | None:
    for task, key in candidates:
        v = (results.get(task) or {}).get(key)
        if isinstance(v, int | float) and not math.isnan(v):
            return round(100.0 * float(v), 1)  # the paper rounds each score to 0.1 before averaging
    return None


def build_table(files: list[Path], missing_as_zero: bool = False) -> tuple[list[str], list[dict]]:
    """Rows (one per model, results of several files merged in file order) and the column names."""
    merged: dict[str, dict] = {}
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise LmmixupError(f"{file}: not a readable JSON file ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise LmmixupError(f"{file}: not an lm-eval results file (no `results` mapping)")
        merged.setdefault(model_label(data, file), {}).update(data["results"])
    rows = []
    for model, results in merged.items():
        row: dict = {"Model": model}
        for col, cands in BENCHMARKS.items():
            row[col] = _value(results, cands)
        missing = [c for c in BENCHMARKS if row[c] is None]
        if missing:
            logger.warning("%s: missing %s%s", model, ", ".join(missing), " (counted as 0)" if missing_as_zero else "")
        avg = openllm_average([row[c] for c in BENCHMARKS], missing_as_zero)
        row[AVG] = None if avg is None else round(avg, 1)
        for col, cands in EXTRAS.items():
            row[col] = _value(results, cands)
        rows.append(row)
    extras = [c for c in EXTRAS if any(r[c] is not None for r in rows)]
    columns = ["Model", *BENCHMARKS, AVG, *extras]
    return columns, [{c: r[c] for c in columns} for r in rows]


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def to_markdown(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(columns) - 1)) + " |"]
    lines += ["| " + " | ".join(_cell(r[c]) or "–" for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_cell(r[c]) for c in columns] for r in rows])
    return buf.getvalue()


def bar_chart(columns: list[str], rows: list[dict], path: Path, title: str) -> None:
    import numpy as np

    from lmmixup_hf.plotting import figure

    metrics = [*BENCHMARKS, AVG]
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(rows))
    with figure(path, (max(6.0, 1.4 * len(metrics)), 4.0), dpi=120) as (_, ax):
        for i, r in enumerate(rows):
            values = [r[m] if r[m] is not None else 0.0 for m in metrics]
            ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=r["Model"])
        ax.set_xticks(x, metrics)
        ax.set_ylabel("score (%)")
        ax.set_title(title)
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)


def eval_report(args: EvalReportArgs) -> list[dict]:
    files = find_result_files(args.results)
    columns, rows = build_table(files, args.missing_as_zero)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_table.md").write_text(to_markdown(columns, rows), encoding="utf-8")
    (out / "eval_table.csv").write_text(to_csv(columns, rows), encoding="utf-8")
    bar_chart(columns, rows, out / "eval_chart.png", args.title)
    print(to_markdown(columns, rows), end="")
    logger.info("wrote %s/eval_table.{md,csv} and eval_chart.png from %d results file(s)", out, len(files))
    return rows
