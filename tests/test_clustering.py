from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmmixup_hf.stages.cluster import (
    LEFTOVER,
    assign,
    capacity_cluster,
    cohesion,
    compact_labels,
    data_cluster,
    refine_swaps,
    sample_caps,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_clustering import adjusted_rand, planted_groups  # noqa: E402
from reference_impls import reference_caps, reference_cluster  # noqa: E402


def planted(n_groups: int, group: int, d: int = 64, noise: float = 0.3, seed: int = 0):
    """``n_groups`` tight groups of ``group`` unit vectors around random directions."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, d))
    truth = np.repeat(np.arange(n_groups), group)
    x = centres[truth] + noise * rng.standard_normal((len(truth), d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(truth))
    return x[perm].astype(np.float32), truth[perm]


@pytest.mark.parametrize("n", [2, 3, 7, 10, 11, 97, 1000, 4321])
@pytest.mark.parametrize("caps", [(2, 5, 3.0, 1.0), (2, 25, 10.0, 3.0), (3, 3, 3.0, 0.0)])
def test_caps_sum_to_n_within_bounds(n, caps):
    lo, hi, mean, std = caps
    c = sample_caps(n, lo, hi, mean, std, seed=42)
    assert c.dtype == np.int64
    assert np.all((c >= lo) & (c <= hi))
    feasible = any(k * lo <= n <= k * hi for k in range(1, n + 1))
    if feasible:
        assert c.sum() == n
    else:  # e.g. n = 7 with sizes in [3, 3]: the remainder becomes leftovers
        assert c.sum() < n and n - c.sum() < lo + hi
    assert np.array_equal(c, sample_caps(n, lo, hi, mean, std, seed=42))


def test_caps_follow_the_normal_and_small_n():
    c = sample_caps(100_000, 2, 25, 10.0, 3.0, seed=42)
    assert abs(c.mean() - 10.0) < 0.1 and abs(c.std() - 3.0) < 0.15
    ref = reference_caps(3000, 2, 5, 3.0, 1.0, seed=42)
    ours = sample_caps(3000, 2, 5, 3.0, 1.0, seed=42)
    assert abs(len(ref) - len(ours)) <= 2  # same distribution, same number of clusters
    assert len(sample_caps(1, 2, 5, 3, 1)) == 0  # fewer rows than min_size: no cluster
    assert not np.array_equal(c[:50], sample_caps(100_000, 2, 25, 10.0, 3.0, seed=7)[:50])


def test_cluster_sizes_are_the_caps_and_deterministic():
    x, _ = planted(200, 3, d=48, noise=0.5)
    a = capacity_cluster(x, min_size=2, max_size=5, mean_cap=3, std_cap=1, seed=42, cell_size=128)
    sizes = np.bincount(a.labels, minlength=len(a.caps))
    assert (a.labels >= 0).all()
    assert np.array_equal(sizes, a.caps)
    assert sizes.min() >= 2 and sizes.max() <= 5 and sizes.sum() == len(x)
    b = capacity_cluster(x, min_size=2, max_size=5, mean_cap=3, std_cap=1, seed=42, cell_size=128)
    assert np.array_equal(a.labels, b.labels)
    c = capacity_cluster(x, min_size=2, max_size=5, mean_cap=3, std_cap=1, seed=1, cell_size=128)
    assert not np.array_equal(a.labels, c.labels)


def test_planted_clusters_are_recovered():
    x, truth = planted(150, 4, d=64, noise=0.15, seed=3)
    res = capacity_cluster(x, min_size=4, max_size=4, mean_cap=4, std_cap=0, seed=42, cell_size=100)
    # a found cluster is "recovered" when all its members share one planted group
    pure = [len(set(truth[res.labels == c])) == 1 for c in range(len(res.caps))]
    assert np.mean(pure) >= 0.9


def test_cohesion_beats_the_reference_on_planted_clusters():
    x, _ = planted(400, 3, d=96, noise=0.45, seed=5)
    ours = capacity_cluster(x, min_size=2, max_size=5, mean_cap=3, std_cap=1, seed=42, cell_size=256)
    ref = reference_cluster(x, reference_caps(len(x), 2, 5, 3.0, 1.0, 42), seed=42)
    assert (ref >= 0).all()
    ours_coh, ref_coh = np.nanmean(cohesion(x, ours.labels)), np.nanmean(cohesion(x, ref))
    assert ours_coh > ref_coh


def test_refinement_raises_cohesion():
    x, _ = planted(300, 3, d=64, noise=0.6, seed=2)
    kw = dict(min_size=2, max_size=5, mean_cap=3, std_cap=1, seed=42, cell_size=128)
    plain = capacity_cluster(x, balance_iters=0, refine_rounds=0, **kw)
    refined = capacity_cluster(x, **kw)
    assert np.array_equal(np.bincount(plain.labels), np.bincount(refined.labels))  # sizes preserved
    assert np.nanmean(cohesion(x, refined.labels)) > np.nanmean(cohesion(x, plain.labels)) + 0.01


def test_swaps_fix_a_crossed_assignment():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    pts = np.stack([a, a, a + 0.1, b, b, b + 0.1]) + 0.01 * rng.standard_normal((6, 16))
    pts = (pts / np.linalg.norm(pts, axis=1, keepdims=True)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 1, 0])  # points 2 and 5 are in the wrong clusters
    cand = np.array([[0, 1]] * 6)
    fixed, swaps = refine_swaps(pts, labels, cand, 2, rounds=3)
    assert swaps == 1
    assert np.array_equal(fixed, [0, 0, 0, 1, 1, 1])


def test_cohesion_is_mean_pairwise_cosine():
    x, _ = planted(5, 4, d=16, noise=1.0)
    labels = np.repeat(np.arange(5), 4)
    sims = x @ x.T
    brute = [sims[np.ix_(labels == c, labels == c)][~np.eye(4, dtype=bool)].mean() for c in range(5)]
    np.testing.assert_allclose(cohesion(x, labels), brute, atol=1e-5)


def test_similarity_floor_sends_outliers_to_leftovers():
    x, _ = planted(60, 3, d=64, noise=0.2, seed=4)
    rng = np.random.default_rng(9)
    out = rng.standard_normal((12, 64)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    allx = np.concatenate([x, out])
    res = capacity_cluster(allx, min_size=2, max_size=5, mean_cap=3, std_cap=1, seed=42, sim_floor=0.6)
    assert (res.labels[-12:] == -1).all()
    sizes = np.bincount(res.labels[res.labels >= 0])
    sizes = sizes[sizes > 0]
    assert sizes.min() >= 2 and sizes.max() <= 5
    assert (sizes <= res.caps.max()).all()
    no_floor = capacity_cluster(allx, min_size=2, max_size=5, mean_cap=3, std_cap=1, seed=42)
    assert (no_floor.labels >= 0).all()


def test_assign_fallback_places_everyone_when_candidates_are_full():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centres = x[:5].copy()
    caps = np.full(5, 4)
    sims = (x @ centres.T)[:, :1]  # only one candidate each: the first centre
    ids = np.zeros((20, 1), np.int64)
    labels = assign(x, centres, caps, sims, ids)
    assert (labels >= 0).all()
    assert np.array_equal(np.bincount(labels, minlength=5), caps)


def test_compact_labels_offsets():
    lab, k = compact_labels(np.array([5, -1, 2, 5, 9]), offset=10)
    assert k == 3 and lab.tolist() == [11, -1, 10, 11, 12]


# -- data-driven sizes ----------------------------------------------------------------------------
@pytest.mark.parametrize("caps", [(2, 5, 3.0, 1.0), (3, 4, 3.0, 1.0), (2, 3, 2.0, 0.0)])
def test_data_sizes_stay_in_bounds_and_every_row_is_accounted(caps):
    lo, hi, mean, std = caps
    x, group = planted_groups(3000, 64, sizes=(2, 7), seed=1)
    res = data_cluster(x, min_size=lo, max_size=hi, mean_cap=mean, std_cap=std, min_cohesion=0.6, cell_size=256)
    placed = res.labels >= 0
    sizes = np.bincount(res.labels[placed])
    assert sizes.min() >= lo and sizes.max() <= hi
    assert np.array_equal(sizes, res.caps)
    assert placed.sum() + (res.labels == LEFTOVER).sum() == len(x)  # rows in = clustered + leftovers
    assert np.nanmin(cohesion(x, res.labels)) >= 0.6  # every cluster holds together
    assert (res.labels[group < 0] == LEFTOVER).all()  # isolated rows are never forced into a cluster


def test_data_sizes_recover_planted_groups_where_drawn_sizes_cannot():
    x, group = planted_groups(4000, 128, seed=2)
    kw = dict(min_size=2, max_size=6, mean_cap=3.0, std_cap=1.0)
    data = data_cluster(x, **kw, cell_size=256)
    drawn = capacity_cluster(x, **kw, cell_size=256)
    assert adjusted_rand(group, data.labels) > 0.95
    assert adjusted_rand(group, drawn.labels) < 0.6
    sizes = np.bincount(data.labels[data.labels >= 0])
    assert np.nanmean(cohesion(x, data.labels)[sizes >= 2]) > 0.8
    assert abs((data.labels < 0).mean() - 0.1) < 0.01  # the 10% isolated rows, and only them
    again = data_cluster(x, **kw, cell_size=256)
    assert np.array_equal(data.labels, again.labels)


def test_data_sizes_find_neighbours_the_coarse_cells_miss():
    # one cell per 16 rows and a single probe: many group mates sit in other cells at first
    x, group = planted_groups(2000, 256, sizes=(2, 2), isolated=0.0, seed=3)
    blind = data_cluster(x, max_size=2, mean_cap=2, std_cap=0, cell_size=16, probe=1, repair_probe=0)
    repaired = data_cluster(x, max_size=2, mean_cap=2, std_cap=0, cell_size=16, probe=1, repair_probe=64)
    assert (blind.labels < 0).mean() > 0.1
    assert (repaired.labels < 0).mean() < (blind.labels < 0).mean() / 4


def test_size_prior_and_min_size_shape_the_clusters():
    x, group = planted_groups(3000, 128, sizes=(6, 6), isolated=0.0, seed=4)
    free = data_cluster(x, min_size=2, max_size=6, mean_cap=3, std_cap=1, size_prior=0.0)
    strict = data_cluster(x, min_size=2, max_size=6, mean_cap=3, std_cap=1, size_prior=0.2)
    assert np.bincount(free.labels[free.labels >= 0]).max() == 6
    # 0.2 per std above 3: a cluster of 4 needs 0.8 mean cosine, 5 needs 1.0, which the groups miss
    assert np.bincount(strict.labels[strict.labels >= 0]).max() <= 4
    pairs, _ = planted_groups(1000, 128, sizes=(2, 2), isolated=0.0, seed=5)
    assert (data_cluster(pairs, min_size=3, max_size=5, mean_cap=3, std_cap=1).labels == LEFTOVER).all()


def test_the_algorithms_defaults_are_the_options_defaults():
    """Called without options, both algorithms cluster as `lmmixup cluster` does by default."""
    import inspect

    from lmmixup_hf.stages.cluster import ClusterOptions

    defaults = ClusterOptions()
    for fn in (capacity_cluster, data_cluster):
        shared = [p for p in inspect.signature(fn).parameters.values() if hasattr(defaults, p.name)]
        assert len(shared) >= 9
        assert {p.name: p.default for p in shared} == {p.name: getattr(defaults, p.name) for p in shared}


def test_data_cluster_edge_cases():
    assert len(data_cluster(np.zeros((0, 8), np.float32)).labels) == 0
    one = np.ones((1, 8), np.float32) / np.sqrt(8)
    assert data_cluster(one).labels.tolist() == [LEFTOVER]
    twins = np.repeat(one, 2, 0)
    assert data_cluster(twins, max_size=2).labels.tolist() == [0, 0]


def _write_pool(path: Path) -> None:
    topics = {
        "dolly": ["photosynthesis in plants", "the French revolution", "volcano eruptions", "jazz music history"],
        "oasst1": ["python list comprehensions", "baking sourdough bread", "marathon training", "black holes"],
    }
    rows = []
    for src, ts in topics.items():
        for t in ts:
            for v in range(5):
                rows.append(
                    {
                        "prompt": f"Question {v} about {t}: what should I know about {t}?",
                        "completion": f"A short answer number {v} explaining {t} in simple words.",
                        "source": src,
                        "rating": {"raw": 5, "score": 1},
                    }
                )
    rows.append({"prompt": "great", "completion": "high quality row", "source": "dolly", "rating": {"score": 5}})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("lmmixup")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_cluster_end_to_end(tmp_path):
    from lmmixup_hf.data.io import read_stage_data

    pool = tmp_path / "pool.jsonl"
    _write_pool(pool)
    out = tmp_path / "clusters"
    args = ["cluster", "--input", str(pool), "--out", str(out), "--embedding_model", "minilm-offline"]
    args += ["--min_size", "2", "--max_size", "5", "--mean_cap", "3", "--std_cap", "1", "--device", "cpu"]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    data = read_stage_data(out)
    table = read_stage_data(out, "clusters")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "cluster_sizes.png").stat().st_size > 1000
    assert len(data) == 40  # the high-quality row is not clustered
    assert manifest["counts"]["skipped_high"] == 1 and manifest["counts"]["clustered"] == 40
    sizes = np.array(table["size"])
    assert sizes.min() >= 2 and sizes.max() <= 5 and sizes.sum() == 40
    # ids are unique across sources: every cluster holds one source only
    by_cluster: dict[int, set] = {}
    for cid, src in zip(data["cluster_id"], data["source"]):
        by_cluster.setdefault(cid, set()).add(src)
    assert all(len(s) == 1 for s in by_cluster.values())
    assert sorted(by_cluster) == list(range(len(table)))
    assert sorted(i for m in table["member_ids"] for i in m) == sorted(data["id"])
    assert 0 < manifest["mean_cohesion"] <= 1
    again = _run(*args)
    assert again.returncode == 0 and "up to date" in again.stderr


def _embedded_pool(path: Path, n: int = 300, seed: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A JSONL pool whose rows bring their own ``embedding`` (planted groups + isolated rows)."""
    x, group = planted_groups(n, 64, sizes=(2, 5), seed=seed)
    rows = [
        {"id": f"r{i}", "prompt": f"p{i}", "completion": f"c{i}", "source": "s", "embedding": v.tolist()}
        for i, v in enumerate(x)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return x, group


def test_cluster_stage_uses_the_embedding_column_and_distils_leftovers_alone(tmp_path):
    from lmmixup_hf.data.io import read_stage_data
    from lmmixup_hf.pipeline.cluster import ClusterArgs, cluster

    x, group = _embedded_pool(tmp_path / "pool.jsonl")
    out = tmp_path / "clusters"
    # a model path that does not exist: loading any embedding model would fail the stage
    args = ClusterArgs(
        input=str(tmp_path / "pool.jsonl"),
        out=str(out),
        embedding_model=str(tmp_path / "no-such-model"),
        quality="all",
        min_size=2,
        max_size=5,
        mean_cap=3,
        std_cap=1,
    )
    data = cluster(args)
    table, leftovers = read_stage_data(out, "clusters"), read_stage_data(out, "leftovers")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["selected"] == len(x) == counts["clustered"] + counts["leftovers"]
    assert counts["leftovers"] == counts["distilled_alone"] == len(leftovers) == int((group < 0).sum())
    assert len(data) == len(x)  # leftovers stay in data/ as one-row clusters, for the distiller
    sizes = np.array(table["size"])
    n_multi = counts["clusters"] - counts["distilled_alone"]  # the one-row clusters come last
    assert len(sizes) == counts["clusters"] == len(set(data["cluster_id"]))
    multi = sizes[:n_multi]
    assert multi.min() >= 2 and multi.max() <= 5 and multi.sum() == counts["clustered"]
    assert (sizes[n_multi:] == 1).all()
    by_id = dict(zip(data["id"], data["cluster_id"]))
    assert sorted(by_id[i] for i in leftovers["id"]) == list(range(n_multi, len(sizes)))
    truth = np.array([group[int(i[1:])] for i in data["id"]])
    assert adjusted_rand(truth, np.array(data["cluster_id"])) > 0.95


def test_cluster_stage_rejects_a_bad_embedding_row(tmp_path):
    from lmmixup_hf.data.schema import LmmixupError
    from lmmixup_hf.pipeline.cluster import ClusterArgs, cluster

    _embedded_pool(tmp_path / "pool.jsonl", n=20)
    lines = (tmp_path / "pool.jsonl").read_text().splitlines()
    row = json.loads(lines[7])
    row["embedding"] = row["embedding"][:5]
    lines[7] = json.dumps(row)
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    args = ClusterArgs(input=str(tmp_path / "pool.jsonl"), out=str(tmp_path / "o"), quality="all")
    with pytest.raises(LmmixupError, match=r"row 'r7'.*embedding.*length 5"):
        cluster(args)


def test_drawn_sizes_through_the_stage_place_every_row(tmp_path):
    from lmmixup_hf.pipeline.cluster import ClusterArgs, cluster

    x, _ = _embedded_pool(tmp_path / "pool.jsonl", n=100)
    out = tmp_path / "drawn"
    args = ClusterArgs(input=str(tmp_path / "pool.jsonl"), out=str(out), quality="all", sizes="drawn")
    args.min_size, args.max_size, args.mean_cap, args.std_cap = 2, 5, 3, 1
    data = cluster(args)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["clustered"] == len(data) == len(x) and counts["leftovers"] == counts["distilled_alone"] == 0
    expected = capacity_cluster(x, min_size=2, max_size=5, mean_cap=3, std_cap=1, seed=42)
    assert counts["clusters"] == len(expected.caps)


def test_cluster_rows_core_in_memory():
    """The core over an in-memory Dataset and its vectors: planted pairs end up together, per source."""
    import numpy as np
    from datasets import Dataset

    from lmmixup_hf.stages.cluster import cluster_rows

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 16))
    x = np.repeat(centres, 2, axis=0) + 0.01 * rng.normal(size=(12, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ds = Dataset.from_dict({"id": [f"r{i:02d}" for i in range(12)], "source": ["a"] * 6 + ["b"] * 6})
    out = cluster_rows(ds, x, min_size=2, max_size=3, mean_cap=2, std_cap=1)
    label = dict(zip(out.rows["id"], out.rows["cluster_id"]))
    assert all(label[f"r{2 * g:02d}"] == label[f"r{2 * g + 1:02d}"] for g in range(6))
    assert out.stats["clustered"] + out.stats["leftovers"] == 12 and out.stats["clusters"] == 6
    assert {s for s in out.clusters["source"]} == {"a", "b"} and out.stats["mean_cohesion"] > 0.99
