"""Ratings the rows already carry: `lmmixup rate --scores_from` takes them instead of asking a judge,
compressed by the judge's rule, with the same outputs; rows without a usable score are quarantined."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmmixup_hf.cli import main
from lmmixup_hf.data.io import read_stage_data
from lmmixup_hf.data.quality import rating_field, rating_scores


def pool(path, rows):
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}", **r}) + "\n" for i, r in enumerate(rows))
    )
    return path


def rate(tmp_path, src, *flags):
    out = tmp_path / "rated"
    status = main(["rate", "--input", str(src), "--out", str(out), "--progress", "false", *flags])
    return status, out


def test_a_numeric_column_on_the_raw_scale(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    raws = [1, 4, 7.6, 8, 10, None, 11]
    src = pool(tmp_path / "p.jsonl", [{"gpt_score": r} for r in raws])
    status, out = rate(tmp_path, src, "--scores_from", "gpt_score")
    assert status == 0  # no key needed, nothing asked
    ds = read_stage_data(out)
    np.testing.assert_array_equal(rating_scores(ds), [0, 0, 4, 4, 5])  # clip(round(raw), 4, 9) - 4
    np.testing.assert_array_equal(rating_field(ds, "raw"), [1, 4, 8, 8, 10])
    assert set(ds["rating"][0]) >= {"raw", "score", "judge"} and ds["rating"][0]["judge"] == "carried:gpt_score"
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (6, "no score in 'gpt_score'"),
        (7, "gpt_score out of 1..10 (--score_scale raw)"),
    ]
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["rated"] == 5 and m["judge"]["model"] == "carried:gpt_score" and m["complete"]
    assert m["counts"]["high"] == 3 and (out / "summary.md").exists()


def test_a_rating_struct_and_the_score_scale(tmp_path):
    rows = [{"rating": {"score": 5}}, {"rating": {"raw": 9}}, {"rating": {"score": 2, "raw": 6}}, {"rating": None}]
    status, out = rate(tmp_path, pool(tmp_path / "p.jsonl", rows), "--scores_from", "rating")
    assert status == 0
    np.testing.assert_array_equal(rating_scores(read_stage_data(out)), [5, 5, 2])

    src = pool(tmp_path / "q.jsonl", [{"s": v} for v in (0, 3, 5)])
    status, out = rate(tmp_path, src, "--scores_from", "s", "--score_scale", "score")
    np.testing.assert_array_equal(rating_scores(read_stage_data(out)), [0, 3, 5])


@pytest.mark.parametrize(
    ("rows", "flag", "message"),
    [
        ([{"x": 1}], "nope", "no column 'nope'"),
        ([{"x": "high"}], "x", "not numbers"),
    ],
)
def test_unusable_columns_fail_in_one_line(tmp_path, capsys, rows, flag, message):
    status, _ = rate(tmp_path, pool(tmp_path / "p.jsonl", rows), "--scores_from", flag)
    assert status == 2 and message in capsys.readouterr().err


def test_run_config_rerate_does_not_inherit_carried_scores(tmp_path):
    import yaml

    from lmmixup_hf.pipeline.run import load_config, select_stages, stage_args

    (tmp_path / "p.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    path = tmp_path / "c.yaml"
    cfg = {"input": str(tmp_path / "p.jsonl"), "rate": {"scores_from": "rating"}, "distill": {"model": "m"}}
    path.write_text(yaml.safe_dump(cfg))
    built = {s.name: stage_args(s, load_config(path)) for s in select_stages(None, None, None)}
    assert built["rate"].scores_from == "rating" and built["rerate"].scores_from is None
