from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmmixup_hf.stages.longtail import long_tail_raw, min_max, score_sets, self_knn_sims

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_impls import reference_long_tail  # noqa: E402


def clustered(n: int, d: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((max(1, n // 20), d))
    x = c[rng.integers(0, len(c), n)] + 0.7 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(x: np.ndarray, k: int, ref: np.ndarray | None = None) -> np.ndarray:
    s = x.astype(np.float64) @ (x if ref is None else ref).astype(np.float64).T
    if ref is None:
        np.fill_diagonal(s, -np.inf)
    return (1 - np.sort(s, axis=1)[:, ::-1][:, :k]).mean(1)


@pytest.mark.parametrize("n,block", [(300, 2048), (301, 64), (130, 50)])
def test_long_tail_equals_brute_force(n, block):
    x = clustered(n)
    np.testing.assert_allclose(long_tail_raw(x, 15), brute(x, 15), atol=1e-5)
    sims = self_knn_sims(x, 15, block=block)
    np.testing.assert_allclose((1 - sims.astype(np.float64)).mean(1), brute(x, 15), atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-7)  # best first


def test_long_tail_equals_sklearn_reference():
    x = clustered(400, d=64, seed=1)
    np.testing.assert_allclose(long_tail_raw(x, 15), reference_long_tail(x, 15), atol=1e-5)


def test_small_sets_and_duplicates():
    x = clustered(5)
    np.testing.assert_allclose(long_tail_raw(x, 15), brute(x, 4), atol=1e-5)  # k capped at n - 1
    assert long_tail_raw(x[:1], 15).tolist() == [0.0]
    dup = np.concatenate([x, x[:1]])
    assert long_tail_raw(dup, 1)[0] == pytest.approx(0.0, abs=1e-6)  # its twin is its neighbour


def test_min_max():
    v = np.array([3.0, 1.0, 2.0])
    assert min_max(v).tolist() == [1.0, 0.0, 0.5]
    assert min_max(np.ones(3)).tolist() == [0.0, 0.0, 0.0]


def test_reference_mode_shares_one_scale():
    x, ref = clustered(120, seed=2), clustered(200, seed=3)
    (raw, norm), (ref_raw, ref_norm) = score_sets(x, ref, k=15, normalize="joint")
    np.testing.assert_allclose(raw, brute(x, 15, ref), atol=1e-5)
    np.testing.assert_allclose(ref_raw, brute(ref, 15), atol=1e-5)
    both_raw, both = np.concatenate([raw, ref_raw]), np.concatenate([norm, ref_norm])
    assert both.min() == 0.0 and both.max() == pytest.approx(1.0)
    # one scale: the order of the normalised scores is the order of the raw distances, across sets
    assert np.array_equal(np.argsort(both_raw, kind="stable"), np.argsort(both, kind="stable"))

    (p_raw, p_norm), (pr_raw, pr_norm) = score_sets(x, ref, k=15, normalize="per_file")
    np.testing.assert_allclose(p_raw, brute(x, 15), atol=1e-5)
    for v in (p_norm, pr_norm):  # each file spans [0, 1] on its own
        assert v.min() == 0.0 and v.max() == pytest.approx(1.0)
    with pytest.raises(Exception, match="joint"):
        score_sets(x, ref, normalize="bogus")


def test_ann_backend_is_close_to_exact():
    pytest.importorskip("faiss")
    x = clustered(2000, d=32, seed=4)
    exact = long_tail_raw(x, 15)
    approx = long_tail_raw(x, 15, backend="hnsw")
    assert np.corrcoef(exact, approx)[0, 1] > 0.95
    assert np.all(approx >= exact - 1e-5)  # an approximate neighbour is never nearer than the true one


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_cli_longtail_with_reference(tmp_path):
    from lmmixup_hf.data.io import read_stage_data

    topics = ["rivers", "chess openings", "tax law", "guitar chords", "bird migration", "sql joins", "tea"]
    orig = [
        {"prompt": f"Tell me about {t}, part {i}.", "completion": f"Facts about {t}, part {i}.", "source": "o"}
        for t in topics
        for i in range(4)
    ]
    dist = [{"prompt": f"Explain {t} briefly.", "completion": f"{t} in one line.", "source": "d"} for t in topics]
    dist.append({"prompt": "Describe quantum chromodynamics.", "completion": "Quarks and gluons.", "source": "d"})
    _write(tmp_path / "orig.jsonl", orig)
    _write(tmp_path / "dist.jsonl", dist)
    out = tmp_path / "lt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("lmmixup")
    args = [str(exe), "longtail", "--input", str(tmp_path / "dist.jsonl"), "--reference", str(tmp_path / "orig.jsonl")]
    args += ["--out", str(out), "--embedding_model", "minilm-offline", "--device", "cpu", "--k", "5"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data, ref = read_stage_data(out), read_stage_data(out, "reference")
    assert len(data) == 8 and len(ref) == 28
    lt = np.array(list(data["long_tail"]) + list(ref["long_tail"]))
    assert lt.min() == 0.0 and lt.max() == pytest.approx(1.0)
    # the off-topic distilled row is the rarest one against the reference
    assert int(np.argmax(data["long_tail_raw"])) == 7
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 8 and manifest["counts"]["reference_rows"] == 28
    # the scored sets feed `mix` directly: the reference split is the original side
    from lmmixup_hf.pipeline.mix import MixArgs, mix

    mixed = mix(
        MixArgs(
            original=str(out / "reference"),
            distilled=str(out),
            out=str(tmp_path / "mix"),
            total=10,
            ratio=0.5,
            dedup_threshold=None,
        )
    )
    rarest = np.argsort(-np.array(data["long_tail"]), kind="stable")[:5]
    picked = sorted(i for i, o in zip(mixed["id"], mixed["origin"]) if o == "distilled")
    assert picked == sorted(data[int(i)]["id"] for i in rarest)


def test_longtail_stage_uses_the_embedding_column(tmp_path):
    from lmmixup_hf.data.io import read_stage_data
    from lmmixup_hf.pipeline.longtail import LongtailArgs, longtail

    x, ref = clustered(40, d=24, seed=1), clustered(120, d=24, seed=2)
    for name, vecs in (("dist", x), ("orig", ref)):
        rows = [
            {"id": f"{name}{i}", "prompt": "same text", "completion": "same", "embedding": v.tolist()}
            for i, v in enumerate(vecs)
        ]
        _write(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / "lt"
    # the texts are all equal and the model does not exist: only the vectors can tell the rows apart
    args = LongtailArgs(
        input=str(tmp_path / "dist.jsonl"),
        reference=str(tmp_path / "orig.jsonl"),
        out=str(out),
        k=5,
        embedding_model=str(tmp_path / "no-such-model"),
    )
    data = longtail(args)
    (raw, norm), (ref_raw, _) = score_sets(x, ref, k=5)
    np.testing.assert_allclose(data["long_tail_raw"], raw, atol=1e-5)
    np.testing.assert_allclose(read_stage_data(out, "reference")["long_tail_raw"], ref_raw, atol=1e-5)


@pytest.mark.parametrize("backend", ["ivf", "partition"])
def test_longtail_stage_records_the_ann_recall(tmp_path, backend):
    if backend == "ivf":
        pytest.importorskip("faiss")
    from lmmixup_hf.pipeline.longtail import LongtailArgs, longtail

    x = clustered(3000, d=16, seed=3)
    rows = [{"id": f"r{i}", "prompt": "p", "completion": "c", "embedding": v.tolist()} for i, v in enumerate(x)]
    _write(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "lt"
    data = longtail(LongtailArgs(input=str(tmp_path / "rows.jsonl"), out=str(out), k=15, backend=backend))
    check = json.loads((out / "manifest.json").read_text())["knn"]["input"]
    assert check["backend"] == backend and check["sample"] == 1000 and check["recall"] >= 0.95
    assert check["max_score_error"] <= 0.01 and check["refined"] == (backend == "partition")
    exact = long_tail_raw(x, 15)
    assert np.abs(np.array(data["long_tail_raw"]) - exact).max() <= max(check["max_score_error"], 0.01) + 0.02


def test_longtail_rows_core_in_memory_and_the_command_stores_vectors(tmp_path):
    """The core scores in-memory rows by their vectors; the command writes the vectors with the
    rows so the mix reuses them without an embedding model."""
    import numpy as np
    from datasets import Dataset

    from lmmixup_hf.data.io import read_stage_data, write_stage_data
    from lmmixup_hf.pipeline.longtail import LongtailArgs, longtail
    from lmmixup_hf.pipeline.mix import MixArgs, mix
    from lmmixup_hf.stages.longtail import longtail_rows

    rng = np.random.default_rng(0)

    def rows(prefix: str, n: int) -> Dataset:
        x = rng.normal(size=(n, 8)).astype(np.float32)
        return Dataset.from_dict(
            {
                "id": [f"{prefix}{i}" for i in range(n)],
                "prompt": [f"{prefix} q{i}" for i in range(n)],
                "completion": [f"{prefix} a{i}" for i in range(n)],
                "source": ["s"] * n,
                "embedding": x.tolist(),
            }
        )

    dist, high = rows("d", 12), rows("h", 20)
    x, y = np.asarray(dist["embedding"]), np.asarray(high["embedding"])
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    scored, ref, checks = longtail_rows(dist, x, high, y, k=3)
    both = np.concatenate([scored["long_tail"], ref["long_tail"]])
    assert both.min() == 0.0 and both.max() == 1.0 and set(checks) == {"reference", "input_vs_reference"}

    write_stage_data(dist, tmp_path / "dist")
    write_stage_data(high, tmp_path / "high")
    for d in ("dist", "high"):
        (tmp_path / d / "manifest.json").write_text(json.dumps({"fingerprint": d}))
    args = LongtailArgs(input=str(tmp_path / "dist"), reference=str(tmp_path / "high"), out=str(tmp_path / "lt"), k=3)
    longtail(args)
    assert np.allclose(read_stage_data(tmp_path / "lt")["long_tail"], scored["long_tail"], atol=1e-6)
    assert "embedding" in read_stage_data(tmp_path / "lt", "reference").column_names
    mixed = mix(
        MixArgs(
            original=str(tmp_path / "lt" / "reference"),
            distilled=str(tmp_path / "lt"),
            out=str(tmp_path / "mix"),
            total=10,
            embedding_model="no-such-model",  # never loaded: the vectors came with the rows
        )
    )
    assert len(mixed) == 10


def test_longtail_stage_with_no_rows_to_score_writes_them_unscored(tmp_path):
    """A strict filter can leave nothing: the stage (on its own, or in `lmmixup run`) writes an empty
    output and the reference rows unscored, never a k-NN over no rows."""
    import datasets

    from lmmixup_hf.data.io import read_stage_data, write_stage_data
    from lmmixup_hf.pipeline.longtail import LongtailArgs, longtail

    empty = tmp_path / "filter"
    write_stage_data(datasets.Dataset.from_dict({"id": [], "prompt": [], "completion": []}), empty)
    ref = tmp_path / "high.jsonl"
    ref.write_text("".join(json.dumps({"id": f"h{i}", "prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(3)))
    out = tmp_path / "longtail"
    assert len(longtail(LongtailArgs(input=str(empty), reference=str(ref), out=str(out)))) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 0 and manifest["counts"]["reference_rows"] == 3 and manifest["complete"]
    scored = read_stage_data(out, "reference")
    assert len(scored) == 3 and all(np.isnan(v) for v in scored["long_tail"])
