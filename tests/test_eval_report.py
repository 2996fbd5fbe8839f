"""`lmmixup eval-report` on lm-eval result files (tests/fixtures/eval/results: the real JSON shape)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.evaluation.report import EvalReportArgs, build_table, eval_report, find_result_files

RESULTS = FIXTURES / "eval" / "results"
BASE = "meta-llama/Llama-3.1-8B"
MIXUP = "llama3.1-8b-lmmixup"


def _raw(model_dir: str) -> dict:
    (file,) = (RESULTS / model_dir).glob("results_*.json")
    return json.loads(file.read_text())["results"]


def test_table_values_from_fixture_results():
    columns, rows = build_table(find_result_files([str(RESULTS)]))
    assert columns == ["Model", "MMLU", "TruthfulQA", "GSM", "BBH", "TyDiQA", "Avg", "TruthfulQA MC2"]
    by_model = {r["Model"]: r for r in rows}
    assert set(by_model) == {BASE, MIXUP}

    raw = _raw("base")
    base = by_model[BASE]
    expected = {
        "MMLU": raw["mmlu_0shot"]["acc,none"],
        "TruthfulQA": raw["truthfulqa_judge"]["truth_info,none"],
        "GSM": raw["gsm8k_8shot_cot_200"]["exact_match,none"],
        "BBH": raw["bbh_3shot_cot_40"]["score,none"],  # the macro mean over tasks, not the micro exact_match
        "TyDiQA": raw["tydiqa_goldp_1shot"]["f1,none"],
    }
    for col, value in expected.items():
        assert base[col] == round(100 * value, 1)
    # Avg = plain mean of the five scores, each rounded to 0.1 first
    assert base["Avg"] == round(sum(round(100 * v, 1) for v in expected.values()) / 5, 1)
    assert base["TruthfulQA MC2"] == round(100 * raw["truthfulqa_mc2_6shot"]["mc2,none"], 1)


def test_missing_benchmark_leaves_avg_empty_or_counts_zero():
    _, rows = build_table(find_result_files([str(RESULTS)]))
    mixup = {r["Model"]: r for r in rows}[MIXUP]
    assert mixup["TyDiQA"] is None and mixup["Avg"] is None

    _, rows = build_table(find_result_files([str(RESULTS)]), missing_as_zero=True)
    mixup = {r["Model"]: r for r in rows}[MIXUP]
    raw = _raw("mixup")
    four = [
        raw["mmlu_0shot"]["acc,none"],
        raw["truthfulqa_judge"]["truth_info,none"],
        raw["gsm8k_8shot_cot_200"]["exact_match,none"],
        raw["bbh_3shot_cot_40"]["score,none"],
    ]
    assert mixup["Avg"] == round(sum(round(100 * v, 1) for v in four) / 5, 1)


def test_results_of_one_model_in_several_files_are_merged(tmp_path):
    data = json.loads(next((RESULTS / "base").glob("results_*.json")).read_text())
    first, second = json.loads(json.dumps(data)), json.loads(json.dumps(data))
    first["results"] = {k: v for k, v in data["results"].items() if k in ("mmlu_0shot", "gsm8k_8shot_cot_200")}
    second["results"] = {k: v for k, v in data["results"].items() if k not in ("mmlu_0shot", "gsm8k_8shot_cot_200")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "results_1.json").write_text(json.dumps(first))
    (tmp_path / "b" / "results_2.json").write_text(json.dumps(second))
    _, merged = build_table(find_result_files([str(tmp_path)]))
    _, whole = build_table(find_result_files([str(RESULTS / "base")]))
    assert merged == whole


def test_writes_markdown_csv_and_png(tmp_path):
    rows = eval_report(EvalReportArgs(results=[str(RESULTS)], out=str(tmp_path)))
    md = (tmp_path / "eval_table.md").read_text()
    assert md.splitlines()[0] == "| Model | MMLU | TruthfulQA | GSM | BBH | TyDiQA | Avg | TruthfulQA MC2 |"
    assert f"| {BASE} | " in md
    with open(tmp_path / "eval_table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["Model"] for r in table} == {r["Model"] for r in rows}
    base_csv = next(r for r in table if r["Model"] == BASE)
    base_row = next(r for r in rows if r["Model"] == BASE)
    assert float(base_csv["Avg"]) == base_row["Avg"]
    assert next(r for r in table if r["Model"] == MIXUP)["TyDiQA"] == ""
    png = (tmp_path / "eval_chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_subprocess(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmmixup_hf.cli",
            "eval-report",
            "--results",
            str(RESULTS / "base"),
            str(RESULTS / "mixup"),
            "--out",
            str(tmp_path),
            "--missing_as_zero",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| Model | MMLU |" in proc.stdout
    assert (tmp_path / "eval_table.csv").exists() and (tmp_path / "eval_chart.png").exists()


def test_cli_error_is_a_message(tmp_path, capsys):
    from lmmixup_hf.cli import main

    assert main(["eval-report", "--results", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "Traceback" not in err


def test_rejects_non_results_json(tmp_path):
    (tmp_path / "results_x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(LmmixupError, match="not an lm-eval results file"):
        build_table(find_result_files([str(tmp_path)]))
    (tmp_path / "results_x.json").write_text("{broken")
    with pytest.raises(LmmixupError, match="not a readable JSON"):
        build_table(find_result_files([str(tmp_path / "results_x.json")]))
    assert Path(tmp_path).exists()
