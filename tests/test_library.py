"""The Bayes quality library: T and p by hand on a toy, the posterior against the reference's worked
check, storage round-trip, the embedding-model check and the CLI stage."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.rewards.library import (
    build_task_library,
    class_histogram,
    library_text,
    load_library,
    load_task_library,
    posterior_from_histogram,
    save_library,
)


def _unit(degrees):
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# Six items on the unit circle: with k_t = 1 each item's nearest other item is its pair partner.
TOY_EMB = _unit([0, 10, 100, 110, 200, 205])
TOY_SCORES = np.array([5, 5, 3, 3, 0, 5])


def test_transition_and_prior_match_hand_computation():
    lib = build_task_library("qa", TOY_EMB, TOY_SCORES, "toy-model", k_t=1)
    assert lib.class_values.tolist() == [0, 3, 5]
    # neighbours: 0<->1 (5->5 twice), 2<->3 (3->3 twice), 4->5 (0->5), 5->4 (5->0); 0.01 in every cell
    counts = np.array([[0.01, 0.01, 1.01], [0.01, 2.01, 0.01], [1.01, 0.01, 2.01]])
    np.testing.assert_allclose(lib.T, counts / counts.sum(axis=1, keepdims=True), rtol=1e-12)
    n = np.array([1, 2, 3]) + 1e-8
    np.testing.assert_allclose(lib.p, n / n.sum(), rtol=1e-12)


# Duplicate texts: items 0 and 2 share one embedding (A) but were scored 5 and 0; B and C are each
# other's nearest item. Values are exact in float32, so the distances are exact too.
DUP_EMB = np.array([[1, 0, 0], [0.6, 0.8, 0], [1, 0, 0], [0, 0.8, 0.6]], dtype=np.float32)
DUP_SCORES = np.array([5, 3, 0, 3])


def test_transition_with_duplicate_texts_matches_the_reference_builder():
    from lmmixup_hf.rewards.library import transition_neighbours

    # the reference lists the k_t + 1 nearest items, self included, and drops the first: A's two copies
    # tie at distance 0 and share the list [0, 2], so item 0 votes for 2 and item 2 votes for itself
    assert transition_neighbours(DUP_EMB, k_t=1).tolist() == [[2], [3], [2], [1]]
    lib = build_task_library("qa", DUP_EMB, DUP_SCORES, "toy-model", k_t=1)
    # classes 0, 3, 5: 5 -> 0 (item 0), 0 -> 0 (item 2, itself), 3 -> 3 twice (B, C)
    counts = np.array([[1.01, 0.01, 0.01], [0.01, 2.01, 0.01], [1.01, 0.01, 0.01]])
    np.testing.assert_allclose(lib.T, counts / counts.sum(axis=1, keepdims=True), rtol=1e-12)
    # a library without duplicates votes with each item's nearest other items, as before
    assert transition_neighbours(TOY_EMB, k_t=1).tolist() == [[1], [0], [3], [2], [5], [4]]


def test_duplicate_texts_against_scikit_learn():
    """The reference's own neighbour search (scikit-learn, cosine) on the same library."""
    neighbors = pytest.importorskip("sklearn.neighbors")
    from lmmixup_hf.rewards.library import transition_neighbours

    _, idx = neighbors.NearestNeighbors(n_neighbors=2, metric="cosine").fit(DUP_EMB).kneighbors(DUP_EMB)
    assert transition_neighbours(DUP_EMB, k_t=1).tolist() == idx[:, 1:].tolist()


def test_transition_neighbours_pad_tiny_libraries():
    from lmmixup_hf.rewards.library import transition_neighbours

    # two copies of one text and k_t = 3: one vote each (the list holds two items), -1 pads the rest
    assert transition_neighbours(DUP_EMB[[0, 2]], k_t=3).tolist() == [[1, -1, -1], [1, -1, -1]]


def test_posterior_reproduces_the_reference_worked_check():
    counts = np.array([[8, 3, 1], [2, 10, 4], [1, 3, 12]], dtype=np.float64) + 0.01
    T = counts / counts.sum(axis=1, keepdims=True)
    p = np.array([0.2, 0.3, 0.5])
    post = posterior_from_histogram(np.array([[0, 2, 14], [1, 7, 8], [3, 8, 5]], dtype=np.float64), T, p)
    E = post @ np.array([2.0, 3.0, 4.0])
    assert E[0] == pytest.approx(3.999999, abs=2e-6) and E[0] < 4
    np.testing.assert_allclose(post[1], [0, 0.4535, 0.5465], atol=1e-4)
    assert E[2] == pytest.approx(3.0031, abs=1e-4)


def test_vectorised_posterior_equals_a_per_row_loop():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    lib = build_task_library("qa", emb, rng.choice([0, 2, 3, 4, 5], size=200), "toy-model", k_t=3)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    post = lib.posterior(q, k=16)
    sims = q @ emb.T
    for i in range(len(q)):
        nbrs = np.argsort(-sims[i])[:16]
        h = np.bincount(lib.class_index[nbrs], minlength=len(lib.class_values))
        logit = np.log(lib.p + 1e-12) + np.array([np.sum(h * np.log(lib.T[c] + 1e-12)) for c in range(len(lib.p))])
        ref = np.exp(logit - logit.max())
        np.testing.assert_allclose(post[i], ref / ref.sum(), rtol=1e-9, atol=1e-12)


def test_class_histogram():
    h = class_histogram(np.array([[0, 0, 2], [1, 2, 2]]), 3)
    assert h.tolist() == [[2, 0, 1], [0, 1, 2]]


def test_round_trip_and_model_check(tmp_path):
    lib = build_task_library("mcq", TOY_EMB, TOY_SCORES, "toy-model", k_t=1)
    save_library({"mcq": lib}, tmp_path)
    assert not list(tmp_path.rglob("*.pkl"))
    back = load_task_library(tmp_path / "mcq", embedding_model="toy-model")
    np.testing.assert_array_equal(back.embeddings, lib.embeddings)
    np.testing.assert_array_equal(back.scores, lib.scores)
    np.testing.assert_array_equal(back.class_values, lib.class_values)
    np.testing.assert_array_equal(back.T, lib.T)
    np.testing.assert_array_equal(back.p, lib.p)
    meta = json.loads((tmp_path / "mcq" / "meta.json").read_text())
    assert meta["embedding_model"] == "toy-model" and meta["k_t"] == 1 and meta["class_counts"] == [1, 2, 3]
    assert list(load_library(tmp_path)) == ["mcq"]
    with pytest.raises(LmmixupError, match="built with embedding model 'toy-model'"):
        load_library(tmp_path, embedding_model="BAAI/bge-m3")
    with pytest.raises(LmmixupError, match="no task libraries"):
        load_library(tmp_path / "mcq")


def test_text_builders_strip_answer_lines():
    assert library_text("mcq", "Q: x?\nA) a\nB) b\nC) c\nD) d\nAnswer: B") == "Q: x?\nA) a\nB) b\nC) c\nD) d"
    assert library_text("tfq_mixup", "Sky is blue.\n  answer : True \n") == "Sky is blue."
    assert library_text("qa", "Q: x\nA: y\nAnswer: z") == "Q: x\nA: y\nAnswer: z"


def test_cli_builds_from_rated_rows_and_reference_keys(tmp_path, minilm_path):
    rows = [
        {
            "task_type": "qa",
            "prompt": "What is the capital of France?",
            "completion": "Paris.",
            "rating": {"raw": 9, "score": 5},
        },
        {"task_type": "qa", "prompt": "capital france", "completion": "idk", "rating": {"raw": 4, "score": 0}},
        {
            "task_type": "qa",
            "prompt": "Who wrote Hamlet?",
            "completion": "Shakespeare.",
            "rating": {"raw": 8, "score": 4},
        },
        {"task_type": "qa", "prompt": "no rating", "completion": "x"},
        "not an object",
    ]
    pool = tmp_path / "rated.jsonl"
    pool.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reference_style = tmp_path / "mcq.json"
    reference_style.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "fine_mcq": "Q: Largest planet?\nA) Mars\nB) Jupiter\nC) Venus\nD) Earth\nAnswer: B",
                        "rating_detail": {"Overall_compressed": 5},
                    },
                    {
                        "fine_mcq": "Q: planet\nA) a\nB) b\nC) c\nD) d\nAnswer: A",
                        "rating_detail": {"Overall_compressed": 1.2},
                    },
                ]
            }
        )
    )
    out = tmp_path / "lib"
    cmd = [
        sys.executable,
        "-m",
        "lmmixup_hf.cli",
        "build-quality-library",
        "--input",
        str(pool),
        "--mcq",
        str(reference_style),
        "--out",
        str(out),
        "--embedding_model",
        "minilm-offline",
        "--k_t",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    libs = load_library(out, embedding_model="minilm-offline")
    assert sorted(libs) == ["mcq", "qa"]
    assert libs["qa"].scores.tolist() == [5, 0, 4] and libs["qa"].embeddings.shape == (3, 384)
    assert libs["mcq"].class_values.tolist() == [1, 5]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {(r["line"], r["field"]) for r in rejected} == {(4, "rating.score"), (5, None)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["items_qa"] == 3 and manifest["counts"]["rejected"] == 2
