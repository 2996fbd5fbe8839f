"""Score curation on planted data: tight topic clusters with a true score each, rated through a known
transition matrix T. HOC must find T, the voting must undo most of the noise, and a clean judge
must be left alone."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset

from lmmixup_hf.data.quality import rating_field, rating_scores
from lmmixup_hf.stages.curate import (
    RAW_SCORE,
    SCORE_ERROR,
    K,
    analytic_consensus,
    consensus,
    curate_rows,
    curate_scores,
    solve_hoc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_curate import PRIOR, transition  # noqa: E402  (the benchmark's planted data, shared)
from bench_curate import planted as planted_rows  # noqa: E402


def planted(n: int = 4000, group: int = 20, dim: int = 16, seed: int = 0, T: np.ndarray | None = None):
    """``(x, true, rated, T)``: ``n // group`` tight clusters in ``dim`` dimensions, one true score each."""
    return planted_rows(n, dim, group, seed=seed, noise=0.05, T=T)


@pytest.fixture(scope="module")
def noisy():
    x, true, rated, T = planted()
    return x, true, rated, T, curate_scores(x, rated.astype(float), rounds=10, seed=0)


def test_hoc_recovers_the_planted_transition_matrix(noisy):
    *_, T, result = noisy
    assert result.T.shape == (K, K)
    np.testing.assert_allclose(result.T.sum(1), 1.0, atol=1e-6)
    assert np.abs(result.T - T).max() < 0.1
    assert np.abs(result.p_clean - PRIOR).max() < 0.06


def test_curation_undoes_most_of_the_noise(noisy):
    _, true, rated, _, result = noisy
    raw_agree = (rated == true).mean()
    assert 0.55 < raw_agree < 0.66  # the judge is right about 60 % of the time
    assert (result.curated == true).mean() >= 0.85
    # the score-error probability means something: flagged rows are mostly the judge's mistakes
    assert (rated[result.flagged] != true[result.flagged]).mean() > 0.85
    assert result.neighbours["signal"] and result.neighbours["observed"] > 2 * result.neighbours["chance"]
    assert result.changed.sum() > 0.25 * len(rated)


def test_a_clean_judge_is_left_alone():
    x, true, rated, _ = planted(seed=1, T=np.eye(K))
    result = curate_scores(x, rated.astype(float), rounds=5, seed=0)
    assert result.changed.mean() < 0.02
    assert np.diag(result.T).min() > 0.9


def test_scores_the_neighbourhood_knows_nothing_about_are_left_alone():
    """Scores unrelated to the embedding (shuffled): neighbours agree no more than chance, so HOC's
    T means nothing and no score moves towards the prior."""
    x, _, rated, _ = planted(seed=5)
    shuffled = np.random.default_rng(0).permutation(rated)
    result = curate_scores(x, shuffled.astype(float), rounds=5, steps=500)
    assert result.neighbours["signal"] is False and result.changed.sum() == 0 and result.flagged.sum() == 0
    assert np.isnan(result.score_error).all() and result.diagnosis()["neighbour_agreement"]["z"] < 3


def test_deterministic_for_a_seed():
    x, _, rated, _ = planted(n=600, seed=2)
    a = curate_scores(x, rated.astype(float), rounds=3, steps=200, seed=7)
    b = curate_scores(x, rated.astype(float), rounds=3, steps=200, seed=7)
    np.testing.assert_array_equal(a.curated, b.curated)
    np.testing.assert_array_equal(a.T, b.T)
    np.testing.assert_array_equal(a.score_error, b.score_error)


def test_consensus_equations_match_simulated_tuples():
    """The analytic consensus is what independent judge errors on same-score tuples produce."""
    rng = np.random.default_rng(0)
    T = transition(rng)
    true = rng.choice(K, 200_000, p=PRIOR)
    tuples = np.stack([(rng.random(len(true))[:, None] > T.cumsum(1)[true]).sum(1) for _ in range(3)], 1)
    counted = consensus(tuples)
    expected = analytic_consensus(torch.as_tensor(T), torch.as_tensor(PRIOR))
    for c, e in zip(counted, expected):
        np.testing.assert_allclose(c, e.numpy(), atol=0.005)
    # and from the exact equations, the solver finds T and p again
    T_hat, p_hat, loss = solve_hoc(tuple(e.numpy() for e in expected), steps=1500)
    assert np.abs(T_hat - T).max() < 0.03 and np.abs(p_hat - PRIOR).max() < 0.02 and loss < 0.01


def test_rows_without_a_score_pass_through():
    x, _, rated, _ = planted(n=400, seed=3)
    ratings = [{"raw": int(s) + 4, "score": int(s), "judge": "j"} for s in rated]
    ratings[5] = None  # no rating at all
    ratings[9] = {"raw": None, "score": None, "judge": "j"}  # a rating without a score
    ds = Dataset.from_dict({"id": [str(i) for i in range(len(x))], "rating": ratings})
    out, result = curate_rows(ds, x, rounds=3, steps=300)
    assert len(out) == len(ds) and out["id"] == ds["id"]
    scores, raw = rating_scores(out), rating_field(out, RAW_SCORE)
    assert np.isnan(scores[[5, 9]]).all() and np.isnan(raw[[5, 9]]).all()
    assert out[5]["rating"] is None and np.isnan(out[SCORE_ERROR][9] or np.nan)
    keep = np.ones(len(x), bool)
    keep[[5, 9]] = False
    np.testing.assert_array_equal(raw[keep], rated[keep])
    np.testing.assert_array_equal(scores[keep], result.curated[keep])
    assert result.diagnosis()["unscored"] == 2 and result.diagnosis()["scored"] == len(x) - 2
    assert out[0]["rating"]["judge"] == "j"  # the rest of the struct is kept
    # curating the curated rows starts again from the judge's scores: the same result
    again, _ = curate_rows(out, x, rounds=3, steps=300)
    assert pa.Table.from_pandas(again.to_pandas()).equals(pa.Table.from_pandas(out.to_pandas()))


# -- the stage: `lmmixup curate` and its place in `lmmixup run` ----------------------------------
def rated_folder(path, n=600, seed=4, T=None):
    """A rated stage folder (as `lmmixup rate` writes it) whose rows carry an `embedding`."""
    from lmmixup_hf.embed.embeddings import with_embeddings
    from lmmixup_hf.pipeline.workflow import StageRun

    x, true, rated, _ = planted(n=n, seed=seed, T=T)
    ds = Dataset.from_dict(
        {
            "id": [f"r{i}" for i in range(n)],
            "prompt": [f"q{i}" for i in range(n)],
            "completion": [f"a{i}" for i in range(n)],
            "source": ["s"] * n,
            "task_type": ["qa"] * n,
            "rating": [{"raw": int(s) + 4, "score": int(s), "judge": "j"} for s in rated],
        }
    )
    StageRun("rate", path).finish(with_embeddings(ds, x), counts={"rated": n})
    return true, rated


def test_curate_command_writes_rows_diagnosis_and_plot(tmp_path):
    import json

    from lmmixup_hf.cli import main

    true, rated = rated_folder(tmp_path / "rate")
    args = ["curate", "--input", str(tmp_path / "rate"), "--out", str(tmp_path / "cur"), "--rounds", "5"]
    assert main(args) == 0
    out = tmp_path / "cur"
    diag = json.loads((out / "diagnosis.json").read_text())
    assert np.asarray(diag["T"]).shape == (K, K) and len(diag["p_clean"]) == K == len(diag["p_rated"])
    assert diag["rows"] == diag["scored"] == len(rated) and diag["unscored"] == 0
    assert 0 < diag["changed"] <= diag["rows"] and diag["flagged"] > 0
    assert (out / "summary.png").stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["changed"] == diag["changed"]
    from lmmixup_hf.data.io import read_stage_data

    ds = read_stage_data(out)
    assert len(ds) == len(rated) and {SCORE_ERROR, "embedding"} <= set(ds.column_names)
    np.testing.assert_array_equal(rating_field(ds, RAW_SCORE), rated)
    assert (rating_scores(ds) == true).mean() > (rated == true).mean() + 0.2
    before = (out / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0  # up to date: skipped, nothing rewritten
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_run_chains_curate_between_rate_and_split_only_when_enabled(tmp_path):
    import yaml

    from lmmixup_hf.pipeline.run import RunArgs, load_config, run, select_stages, stage_args

    run_dir = tmp_path / "run"
    cfg = {"name": "c", "input": str(tmp_path / "pool.jsonl"), "out_dir": str(run_dir), "distill": {"model": "m"}}
    (tmp_path / "pool.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    built = {s.name: stage_args(s, load_config(path)) for s in select_stages(None, None, None)}
    assert built["curate"].enabled is False and built["split"].input == str(run_dir / "rate")

    path.write_text(yaml.safe_dump({**cfg, "curate": {"enabled": True, "rounds": 5}, "split": {"threshold": 3}}))
    built = {s.name: stage_args(s, load_config(path)) for s in select_stages(None, None, None)}
    assert built["split"].input == str(run_dir / "curate") and built["curate"].input == str(run_dir / "rate")

    from lmmixup_hf.pipeline.workflow import StageRun

    StageRun("ingest", run_dir / "ingest").finish(None)
    true, rated = rated_folder(run_dir / "rate")
    assert run(RunArgs(config=str(path), from_stage="curate", to_stage="split")) == 0
    from lmmixup_hf.data.io import read_stage_data

    high = read_stage_data(run_dir / "split" / "high")
    curated = rating_scores(read_stage_data(run_dir / "curate"))
    assert len(high) == (curated >= 3).sum() != (rated >= 3).sum()  # the split saw the curated scores
    assert (rating_scores(high) >= 3).all()


def test_mix_ranks_originals_by_curated_score_then_long_tail():
    """DS2's selection, as the mix already does it: the curated score first, then the long-tail score;
    the judge's own score (``raw_score``) plays no part."""
    from lmmixup_hf.stages.mix import rank_original

    ds = Dataset.from_dict(
        {
            "rating": [{"score": s, RAW_SCORE: r} for s, r in [(4, 5), (5, 2), (4, 1), (5, 5), (3, 5)]],
            "long_tail": [0.9, 0.1, 0.95, 0.5, 1.0],
        }
    )
    assert rank_original(ds).tolist() == [3, 1, 2, 0, 4]


def test_curate_embeds_rows_without_an_embedding(tmp_path, minilm_path, monkeypatch):
    """No `embedding` column: the stage embeds the rows with the model (here the offline MiniLM) and
    writes the vectors with them; the scores the rows carry come in through `rate --scores_from`."""
    import json
    from pathlib import Path

    from lmmixup_hf.cli import main
    from lmmixup_hf.data.io import read_stage_data

    monkeypatch.setenv("LMMIXUP_EMBEDDING_CACHE", str(tmp_path / "emb-cache"))
    lines = (Path(__file__).resolve().parents[1] / "data" / "sample_pool.jsonl").read_text().splitlines()[:60]
    rows = [{**json.loads(line), "label": i % 6} for i, line in enumerate(lines)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rate = ["rate", "--input", str(tmp_path / "pool.jsonl"), "--out", str(tmp_path / "rate")]
    assert main([*rate, "--scores_from", "label", "--score_scale", "score", "--progress", "false"]) == 0
    cur = ["curate", "--input", str(tmp_path / "rate"), "--out", str(tmp_path / "cur"), "--device", "cpu"]
    assert main([*cur, "--embedding_model", "minilm-offline", "--rounds", "3", "--steps", "300"]) == 0
    ds, rated = read_stage_data(tmp_path / "cur"), read_stage_data(tmp_path / "rate")
    assert len(ds) == len(rated) > 50 and len(ds[0]["embedding"]) == 384  # the sample pool has one bad row
    np.testing.assert_array_equal(rating_field(ds, RAW_SCORE), rated["label"])
    assert json.loads((tmp_path / "cur" / "diagnosis.json").read_text())["scored"] == len(rated)
