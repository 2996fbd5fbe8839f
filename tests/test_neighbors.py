"""Exact kNN equals brute force, never materialises more than one score block, and ANN is close."""

import numpy as np
import pytest

from lmmixup_hf.embed import neighbors
from lmmixup_hf.embed.neighbors import knn


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q, keys, k, exclude_self):
    s = q @ keys.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("qb,kb", [(7, 11), (64, 1000), (1024, 32768)])
def test_self_knn_equals_brute_force(qb, kb):
    x = _unit(300, 16)
    sims, idx = knn(x, k=5, query_block=qb, key_block=kb)
    bs, bi = _brute(x, x, 5, True)
    np.testing.assert_allclose(sims, bs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(idx, bi)
    assert not (idx == np.arange(300)[:, None]).any()  # self excluded


def test_query_against_keys_and_k_capping():
    q, keys = _unit(20, 8, 1), _unit(50, 8, 2)
    sims, idx = knn(q, keys, k=4, query_block=6, key_block=13)
    bs, bi = _brute(q, keys, 4, False)
    np.testing.assert_array_equal(idx, bi)
    np.testing.assert_allclose(sims, bs, rtol=1e-5, atol=1e-6)
    s3, i3 = knn(_unit(3, 8), k=10)
    assert i3.shape == (3, 2)  # only n-1 neighbours exist


def test_memory_is_bounded_by_block_size(monkeypatch):
    shapes = []
    real = neighbors._block_scores

    def spy(q, kt):
        out = real(q, kt)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(neighbors, "_block_scores", spy)
    knn(_unit(1000, 8), k=3, query_block=100, key_block=250)
    assert max(a * b for a, b in shapes) <= 100 * 250  # never an N x N matrix
    assert len(shapes) == 10 * 4


def test_faiss_backends_have_high_recall():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    centres = _unit(40, 32, 3)
    x = centres[rng.integers(0, 40, 4000)] + 0.05 * rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, exact = knn(x, k=10)
    for backend in ("ivf", "hnsw"):
        _, approx = knn(x, k=10, backend=backend)
        assert not (approx == np.arange(4000)[:, None]).any()
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
        assert recall > 0.8, (backend, recall)


def test_faiss_similarities_are_cosines():
    pytest.importorskip("faiss")
    x = _unit(2000, 16, 5)
    for backend in ("ivf", "hnsw"):
        sims, idx = knn(x, k=5, backend=backend)
        np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", x, x[idx]), atol=1e-4)


def _recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[1] for x, y in zip(a, b)]))


def test_ann_measures_its_own_recall_and_tunes_its_effort():
    pytest.importorskip("faiss")
    x = _unit(4000, 24, 7)  # uniform on the sphere: ANN's hard case, the first nprobe is not enough
    _, exact = knn(x, k=10)
    sims, ids, check = neighbors.checked_knn(x, k=10, backend="ivf", sample=400, seed=1)
    true_recall = _recall(ids, exact)
    assert check.backend == "ivf" and check.sample == 400 and check.nlist > 8
    assert check.effort > 8  # nprobe was raised from its start
    assert check.recall >= 0.95 and true_recall >= 0.93
    assert abs(check.recall - true_recall) < 0.03  # the sampled estimate is the real recall
    assert not (ids == np.arange(4000)[:, None]).any()
    np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", x, x[ids]), atol=1e-4)
    assert 0 <= check.max_score_error <= 0.01  # the second target the effort was tuned for
    # a floor the index cannot reach within its effort budget: reported, not hidden
    _, _, low = neighbors.checked_knn(x, k=10, backend="ivf", sample=200, min_recall=1.01)
    assert low.recall < 1.01 and low.effort == low.nlist


def _planted(n_groups, size, d, seed, spread=0.3):
    """Rows in planted groups of ``size`` (within-group cosine about 1 / (1 + spread^2 d / d))."""
    rng = np.random.default_rng(seed)
    centres = _unit(n_groups, d, seed + 100)
    x = np.repeat(centres, size, 0) + spread * rng.standard_normal((n_groups * size, d)).astype(np.float32) / np.sqrt(
        d
    ).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), np.repeat(np.arange(n_groups), size)[perm]


def test_partition_search_probing_every_cell_is_exact():
    x = _unit(1500, 16, 11)
    part = neighbors.build_partition(x, cell_size=100)
    assert part.nlist == 15 and sorted(part.order.tolist()) == list(range(1500))
    s, i = neighbors.partition_search(part, x, x, 7, part.nlist, query_ids=np.arange(1500))
    es, ei = _brute(x, x, 7, True)
    np.testing.assert_allclose(s, es, atol=1e-5)
    assert _recall(i, ei) > 0.999 and not (i == np.arange(1500)[:, None]).any()
    # queries that are not the keys: nothing is excluded, the nearest cell is found per query
    q = _unit(200, 16, 12)
    s, i = neighbors.partition_search(part, x, q, 5, part.nlist)
    np.testing.assert_allclose(s, _brute(q, x, 5, False)[0], atol=1e-5)


def test_partition_finds_planted_groups_and_excludes_self():
    x, _ = _planted(150, 20, 32, 1)
    es, ei = knn(x, k=15)
    s, i = knn(x, k=15, backend="partition", nprobe=2)
    assert not (i == np.arange(len(x))[:, None]).any()
    assert all(len(set(row)) == 15 for row in i)
    np.testing.assert_allclose(s, np.einsum("nd,nkd->nk", x, x[i]), atol=1e-5)
    assert _recall(i, ei) >= 0.95
    assert np.abs((1 - s).mean(1) - (1 - es).mean(1)).max() <= 0.01


def test_refinement_repairs_a_split_group():
    x, group = _planted(40, 20, 32, 2)
    es, ei = knn(x, k=10)
    sims, ids = es.copy(), ei.copy()
    members = np.flatnonzero(group == group[0])
    others = np.flatnonzero(group != group[0])
    a, b = members[0], members[1]
    # a found one group mate and then only strangers; b found no group mate at all, but a found b
    ids[a] = np.concatenate([[b], others[:9]])
    ids[b] = others[9:19]
    for r in (a, b):
        sims[r] = x[ids[r]] @ x[r]
        order = np.argsort(-sims[r])
        sims[r], ids[r] = sims[r][order], ids[r][order]
    assert _recall(ids[[a, b]], ei[[a, b]]) < 0.1
    # one round: a reaches its mates through the mates that found it (reverse neighbours) and their
    # lists, b through a, which found it; only group mates again, close to the exact score
    rs, ri = neighbors.refine_self(x, sims, ids, rounds=1)
    assert set(ri[[a, b]].ravel()) <= set(members)
    err = np.abs((1 - rs[[a, b]]).mean(1) - (1 - es[[a, b]]).mean(1))
    assert _recall(ri[[a, b]], ei[[a, b]]) >= 0.7 and err.max() <= 0.01, err
    # the second round (the default) spreads what the first found: exact again
    rs, ri = neighbors.refine_self(x, sims, ids)
    np.testing.assert_array_equal(np.sort(ri[[a, b]], 1), np.sort(ei[[a, b]], 1))
    assert np.all(rs >= sims - 1e-6)  # a rescored superset: never worse at any rank
    np.testing.assert_allclose(rs, np.einsum("nd,nkd->nk", x, x[ri]), atol=1e-5)
    untouched = np.setdiff1d(np.arange(len(x)), members)
    np.testing.assert_array_equal(ri[untouched], ei[untouched])
    assert not (ri == np.arange(len(x))[:, None]).any()
    assert all(len(set(row)) == 10 for row in ri)


def test_partition_checks_itself():
    x, _ = _planted(200, 20, 32, 3)
    _, exact = knn(x, k=15)
    sims, ids, check = neighbors.checked_knn(x, k=15, backend="partition", sample=500)
    assert check.backend == "partition" and check.refined and check.sample == 500 and check.nlist > 8
    assert check.recall >= 0.95 and check.max_score_error <= 0.01 and check.mean_score_error <= check.max_score_error
    assert _recall(ids, exact) >= 0.95 and not (ids == np.arange(len(x))[:, None]).any()
    assert abs(check.recall - _recall(ids, exact)) < 0.02  # the sample measured the final, refined result
    np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", x, x[ids]), atol=1e-5)
    # queries against other keys: no refinement, so the probes are tuned to both targets directly
    q, _ = _planted(200, 2, 32, 3)
    s, i, cross = neighbors.checked_knn(q, x, k=15, backend="partition", sample=300)
    es, ei = knn(q, x, k=15)
    assert cross.backend == "partition" and not cross.refined
    assert cross.recall >= 0.95 and cross.max_score_error <= 0.01 and _recall(i, ei) >= 0.9
    # a floor no search short of exact reaches: reported, with every cell probed in the end
    _, _, low = neighbors.checked_knn(x, k=15, backend="partition", sample=200, min_recall=1.01)
    assert low.backend == "partition" and low.recall <= 1.0 and low.effort == low.nlist


def test_auto_uses_ann_only_when_it_keeps_its_recall(monkeypatch):
    x = _unit(3000, 16, 8)  # uniform on the sphere: no structure for cells to use
    exact_s, exact_i = knn(x, k=8)
    _, _, small = neighbors.checked_knn(x, k=8, backend="auto")
    assert small.backend == "exact" and "fewer than" in small.reason  # below AUTO_MIN_KEYS: no ANN at all
    monkeypatch.setattr(neighbors, "AUTO_MIN_KEYS", 0)
    s, i, strict = neighbors.checked_knn(x, k=8, backend="auto", min_recall=1.01)
    assert strict.backend == "exact" and strict.reason.startswith("partition recall") and strict.recall is not None
    assert np.array_equal(i, exact_i) and np.array_equal(s, exact_s)
    xg, _ = _planted(150, 20, 32, 4)
    s, i, loose = neighbors.checked_knn(xg, k=15, backend="auto", max_error=1.0, min_recall=0.0)
    # with no accuracy floor, the choice is speed alone: partition unless its tuning was estimated slower
    if loose.backend == "exact":
        assert loose.reason == "partition not faster"
    else:
        assert loose.backend == "partition" and loose.seconds_ann_estimate is not None


def test_device_option():
    import torch

    from lmmixup_hf.data.schema import LmmixupError
    from lmmixup_hf.stages.cluster import capacity_cluster, data_cluster
    from lmmixup_hf.stages.longtail import long_tail_raw

    assert neighbors.resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    x = _unit(600, 16, 9)
    assert np.array_equal(knn(x, k=5, device="cpu")[1], knn(x, k=5, device=neighbors.resolve_device(None))[1])
    kw = dict(min_size=2, max_size=5, mean_cap=3, std_cap=1, cell_size=128)
    for fn in (data_cluster, capacity_cluster):
        assert np.array_equal(fn(x, **kw, device="cpu").labels, fn(x, **kw, device=None).labels)
    np.testing.assert_allclose(long_tail_raw(x, 5, device="cpu"), long_tail_raw(x, 5), atol=1e-6)
    if not torch.cuda.is_available():
        with pytest.raises(LmmixupError, match="device 'cuda' is not available"):
            knn(x, k=5, device="cuda")


def test_plain_knn_auto_is_the_checked_rule(monkeypatch):
    """`knn(backend="auto")` goes through `checked_knn`: on rows with no structure its ANN misses the
    recall target, so the answer is the exact one."""
    x = _unit(3000, 16, 8)
    monkeypatch.setattr(neighbors, "AUTO_MIN_KEYS", 0)
    calls = []
    checked = neighbors.checked_knn
    monkeypatch.setattr(neighbors, "checked_knn", lambda *a, **kw: calls.append(kw["backend"]) or checked(*a, **kw))
    s, i = knn(x, k=8, backend="auto")
    exact_s, exact_i = knn(x, k=8)
    assert calls == ["auto"] and np.array_equal(i, exact_i) and np.array_equal(s, exact_s)
