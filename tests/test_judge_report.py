"""`lmmixup judge-report` and its figures: kappa as scikit-learn computes it, Spearman as scipy does,
and the command on two small rated pools matched by id."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score

from lmmixup_hf.cli import main
from lmmixup_hf.judge.agreement import agreement, cohen_kappa, rankdata, spearman


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kappa_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, 500)
    b = np.clip(a + rng.integers(-2, 3, 500), 0, 5)
    assert cohen_kappa(a, b, "quadratic") == pytest.approx(cohen_kappa_score(a, b, weights="quadratic"), abs=1e-12)
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert cohen_kappa(a, b, "linear") == pytest.approx(cohen_kappa_score(a, b, weights="linear"), abs=1e-12)
    # a score nobody used still counts as a score: scikit-learn agrees when told all six labels
    a2, b2 = np.where(a == 3, 2, a), np.where(b == 3, 2, b)
    assert cohen_kappa(a2, b2, "quadratic") == pytest.approx(
        cohen_kappa_score(a2, b2, weights="quadratic", labels=list(range(6))), abs=1e-12
    )
    report = agreement(a, b, threshold=4)
    ha, hb = (a >= 4).astype(int), (b >= 4).astype(int)
    assert report["high_low_kappa"] == pytest.approx(cohen_kappa_score(ha, hb), abs=1e-12)
    assert report["high_low_agreement"] == pytest.approx((ha == hb).mean())
    assert report["exact_agreement"] == pytest.approx((a == b).mean())
    assert np.asarray(report["confusion"]).sum() == 500 and np.trace(report["confusion"]) == (a == b).sum()


def test_spearman_equals_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 300).astype(float)  # many ties
    y = x * 40 + rng.normal(0, 60, 300)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    np.testing.assert_array_equal(rankdata(np.array([3, 1, 3, 2])), [3.5, 1, 3.5, 2])
    assert np.isnan(spearman(np.ones(5), np.arange(5)))


def write_pool(path, scores, ids=None, lengths=None):
    ids = ids or [f"r{i}" for i in range(len(scores))]
    lengths = lengths or [10 + 5 * i for i in range(len(scores))]
    with open(path, "w") as f:
        for i, s, n in zip(ids, scores, lengths):
            rating = None if s is None else {"raw": s + 4, "score": s}
            f.write(json.dumps({"id": i, "prompt": f"q {i}", "completion": "x" * n, "rating": rating}) + "\n")
    return path


def test_judge_report_command(tmp_path, capsys):
    a = [0, 1, 2, 3, 4, 5, 5, 4, 3, None]
    b = [0, 1, 3, 3, 5, 5, 2, 4, 3, 2]
    pa_ = write_pool(tmp_path / "a.jsonl", a)
    pb = write_pool(tmp_path / "b.jsonl", b + [1], ids=[f"r{i}" for i in range(11)])
    assert main(["judge-report", "--ratings", str(pa_), "--against", str(pb), "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "judge_report.json").read_text())
    sa, sb = np.array(a[:9]), np.array(b[:9])
    assert rep["n"] == 9 and rep["ids_in_both"] == 10 and rep["unscored_in_both"] == 1
    assert rep["only_in_ratings"] == 0 and rep["only_in_against"] == 1
    assert rep["quadratic_kappa"] == pytest.approx(
        cohen_kappa_score(sa, sb, weights="quadratic", labels=list(range(6))), abs=1e-4
    )
    assert rep["exact_agreement"] == pytest.approx((sa == sb).mean(), abs=1e-4)
    assert rep["threshold"] == 4 and len(rep["confusion"]) == 6
    # completions get longer down the file, and so do the scores of `a`, mostly
    assert rep["length_bias"]["ratings"] == pytest.approx(spearmanr(sa, 10 + 5 * np.arange(9)).statistic, abs=1e-4)
    assert (tmp_path / "rep" / "judge_report.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "quadratic-weighted kappa" in out and "confusion" in out


def test_judge_report_needs_shared_ids(tmp_path, capsys):
    pa_ = write_pool(tmp_path / "a.jsonl", [1, 2], ids=["a", "b"])
    pb = write_pool(tmp_path / "b.jsonl", [1, 2], ids=["c", "d"])
    assert main(["judge-report", "--ratings", str(pa_), "--against", str(pb), "--out", str(tmp_path / "r")]) == 2
    assert "share no `id`" in capsys.readouterr().err


def test_repeat_measures_self_consistency_and_parse_failures(tmp_path, monkeypatch, capsys):
    """The judge asked again (loopback server): its scores come back the same, and a reply with no
    score counts as a parse failure."""
    from openai_server import judge_responder, server_factory

    from lmmixup_hf.data.io import read_stage_data

    factory = server_factory()
    server = next(factory)(judge_responder)
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-judge-report")
        texts = ["What is 2+2?", "Name a colour.", "Say hi.", "Count to three.", "Spell cat."]
        with open(tmp_path / "pool.jsonl", "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": f"r{i}", "prompt": t, "completion": f"answer {i}"}) + "\n")
        judge = ["--judge_model", "stub", "--base_url", server.base_url]
        rate = [
            "rate",
            "--input",
            str(tmp_path / "pool.jsonl"),
            "--out",
            str(tmp_path / "rated"),
            "--progress",
            "false",
        ]
        assert main([*rate, *judge, "--cache_dir", "none", "--max_retries", "0"]) == 0
        rated = {r["id"]: r["rating"]["score"] for r in read_stage_data(tmp_path / "rated")}
        # the same rows and scores as a pool file, the last answer now one the judge cannot score
        with open(tmp_path / "ratings.jsonl", "w") as f:
            for i, t in enumerate(texts):
                row = {"id": f"r{i}", "prompt": t, "completion": "UNPARSEABLE" if i == 4 else f"answer {i}"}
                f.write(json.dumps({**row, "rating": {"score": rated.get(f"r{i}", 2)}}) + "\n")
        argv = ["judge-report", "--ratings", str(tmp_path / "ratings.jsonl"), "--against", str(tmp_path / "rated")]
        assert main([*argv, "--out", str(tmp_path / "rep"), "--repeat", "10", *judge]) == 0
        sc = json.loads((tmp_path / "rep" / "judge_report.json").read_text())["self_consistency"]
        assert sc["asked"] == 5 and sc["scored"] == 4 and sc["parse_failures"] == 1
        assert sc["parse_failure_rate"] == 0.2 and sc["exact_agreement"] == 1.0 and sc["other_failures"] == 0
        assert "parse-failure rate" in capsys.readouterr().out
        assert "sk-test-judge-report" not in (tmp_path / "rep" / "judge_report.json").read_text()
    finally:
        next(factory, None)


def test_repeat_needs_a_judge(tmp_path, capsys):
    pa_ = write_pool(tmp_path / "a.jsonl", [1, 2])
    argv = [
        "judge-report",
        "--ratings",
        str(pa_),
        "--against",
        str(pa_),
        "--out",
        str(tmp_path / "r"),
        "--repeat",
        "3",
    ]
    assert main(argv) == 2 and "--repeat needs --judge_model" in capsys.readouterr().err


def test_a_score_off_the_scale_is_named(tmp_path, capsys):
    pa_ = write_pool(tmp_path / "a.jsonl", [1, 7])
    pb = write_pool(tmp_path / "b.jsonl", [1, 2])
    assert main(["judge-report", "--ratings", str(pa_), "--against", str(pb), "--out", str(tmp_path / "r")]) == 2
    assert "row 2: rating.score 7 is not a score 0-5" in capsys.readouterr().err
