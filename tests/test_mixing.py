from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from lmmixup_hf.data.schema import LmmixupError, text_of
from lmmixup_hf.pipeline.mix import MixArgs, mix
from lmmixup_hf.stages.mix import greedy_dedup

SUBJECTS = [
    "volcanoes",
    "sourdough bread",
    "the Roman senate",
    "binary search",
    "photosynthesis",
    "jazz harmony",
    "tax deductions",
    "marathon pacing",
    "black holes",
    "knitting patterns",
    "SQL indexes",
    "bee colonies",
    "medieval castles",
    "solar panels",
    "chess endgames",
    "coral reefs",
    "vaccines",
    "origami cranes",
    "stock options",
    "glaciers",
    "opera singing",
    "rust ownership",
    "desert cacti",
    "wine tasting",
    "submarines",
    "the printing press",
    "yoga breathing",
    "cryptography",
    "kangaroos",
    "wind tunnels",
    "fermented tea",
    "pottery glazes",
    "lighthouses",
    "tectonic plates",
    "haiku poetry",
    "electric guitars",
]


M = {"embedding_model": "minilm-offline", "device": "cpu"}


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_greedy_dedup_keeps_first_of_each_near_duplicate_group():
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((10, 64)))
    x = np.concatenate([base, unit(base[[1, 4]] + 0.01 * rng.standard_normal((2, 64)))])  # rows 10, 11 copy 1, 4
    x = np.concatenate([x, base[[1]]])  # row 12 copies row 1 exactly
    assert greedy_dedup(x, 100, 0.92).tolist() == list(range(10))
    assert greedy_dedup(x, 100, 0.92, block=3).tolist() == list(range(10))  # across block borders
    assert greedy_dedup(x, 4, 0.92).tolist() == [0, 1, 2, 3]  # the quota stops the walk
    kept = base[[2]]
    assert 2 not in greedy_dedup(x, 100, 0.92, kept=kept).tolist()  # a kept row from elsewhere wins


def _rows(prefix: str, subjects: list[str], source: str, long_tail: bool) -> list[dict]:
    rows = []
    for i, s in enumerate(subjects):
        row = {
            "id": f"{prefix}{i}",
            "prompt": f"{prefix.upper()} question: what is remarkable about {s}?",
            "completion": f"A detailed note on {s}.",
            "source": source,
        }
        if long_tail:
            row["long_tail"] = round(1 - i / len(subjects), 4)
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def pools(tmp_path):
    orig = _rows("o", SUBJECTS[:18], "orig", long_tail=False)
    dist = _rows("d", SUBJECTS[18:], "mixup", long_tail=True)
    # three distilled rows that are the same as original rows (cosine 1.0 >= 0.92): they must go
    for j, o in enumerate(orig[:3]):
        dist.append({**o, "id": f"dup{j}", "source": "mixup", "long_tail": 0.99 - j * 0.01})
    return _write(tmp_path / "orig.jsonl", orig), _write(tmp_path / "dist.jsonl", dist)


def test_rank_original_ties_missing_values_and_absent_columns():
    """The originals' ranking, against its definition written as a Python sort: score descending
    (no score after score 0), then long-tail descending (none after any), then input order."""
    from lmmixup_hf.stages.mix import rank_original

    rng = np.random.default_rng(0)
    n = 200
    score = rng.integers(0, 6, n).astype(float)
    score[rng.random(n) < 0.1] = np.nan
    lt = rng.choice([0.1, 0.5, 0.9], n)  # few values: many full ties
    lt[rng.random(n) < 0.1] = np.nan
    rating = [None if np.isnan(s) else {"score": int(s)} for s in score]
    ds = Dataset.from_dict({"rating": rating, "long_tail": [None if np.isnan(v) else v for v in lt]})

    s = np.where(np.isnan(score), -1, score)
    t = np.where(np.isnan(lt), -np.inf, lt)
    assert rank_original(ds).tolist() == sorted(range(n), key=lambda i: (-s[i], -t[i], i))
    assert rank_original(ds.remove_columns("long_tail")).tolist() == sorted(range(n), key=lambda i: (-s[i], i))
    assert rank_original(ds.remove_columns("rating")).tolist() == sorted(range(n), key=lambda i: (-t[i], i))
    assert rank_original(Dataset.from_dict({"x": [3, 1, 2]})).tolist() == [0, 1, 2]


def test_mix_exact_size_ratio_and_dedup(pools, tmp_path, embedder):
    orig, dist = pools
    args = MixArgs(**M, original=str(orig), distilled=str(dist), out=str(tmp_path / "mix"), total=20, ratio=0.4)
    out = mix(args)
    assert len(out) == 20
    origin = list(out["origin"])
    assert origin.count("distilled") == 8 and origin.count("original") == 12
    ids = list(out["id"])
    assert not any(i.startswith("dup") for i in ids)  # near-duplicates of original rows removed
    # the 8 distilled rows are the 8 highest long-tail ones once the duplicates are gone
    assert sorted(i for i in ids if i.startswith("d")) == sorted(f"d{i}" for i in range(8))
    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    assert manifest["counts"]["dedup_removed_distilled"] == 3
    assert manifest["counts"]["dedup_removed_original"] == 0
    # exactly the near-duplicates: no pair left above the threshold
    vecs = embedder.encode([text_of(r) for r in out])
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 0.92
    # both formats hold the same rows, in the same shuffled order
    from lmmixup_hf.data.io import read_stage_data

    msgs = read_stage_data(tmp_path / "mix", "messages")
    assert list(msgs["id"]) == ids
    first = msgs[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[0]["content"] == out[0]["prompt"]
    # deterministic shuffle: same seed, same order; another seed, another order
    again = mix(MixArgs(**M, original=str(orig), distilled=str(dist), out=str(tmp_path / "mix2"), total=20, ratio=0.4))
    other = mix(
        MixArgs(**M, original=str(orig), distilled=str(dist), out=str(tmp_path / "mix3"), total=20, ratio=0.4, seed=1)
    )
    assert list(again["id"]) == ids and list(other["id"]) != ids and sorted(other["id"]) == sorted(ids)


def test_mix_not_enough_rows_is_an_error(pools, tmp_path, embedder):
    orig, dist = pools
    with pytest.raises(LmmixupError, match=r"distilled: need 30, have 21"):
        mix(MixArgs(**M, original=str(orig), distilled=str(dist), out=str(tmp_path / "m"), total=40, ratio=0.75))
    out = mix(
        MixArgs(
            **M,
            original=str(orig),
            distilled=str(dist),
            out=str(tmp_path / "m2"),
            total=40,
            ratio=0.75,
            allow_fewer=True,
        )
    )
    assert len(out) == 10 + 18
    manifest = json.loads((tmp_path / "m2" / "manifest.json").read_text())
    assert manifest["shortfall"] == {"distilled": 12}


def test_mix_requires_long_tail(tmp_path, embedder):
    orig = _write(tmp_path / "o.jsonl", _rows("o", SUBJECTS[:4], "x", long_tail=False))
    with pytest.raises(LmmixupError, match="lmmixup longtail"):
        mix(
            MixArgs(
                **M, original=str(orig), distilled=str(orig), out=str(tmp_path / "m"), total=2, dedup_threshold=None
            )
        )


def test_cli_mix(pools, tmp_path):
    from lmmixup_hf.data.io import read_stage_data

    orig, dist = pools
    out = tmp_path / "cli-mix"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("lmmixup")
    args = [str(exe), "mix", "--original", str(orig), "--distilled", str(dist), "--out", str(out)]
    args += ["--total", "10", "--ratio", "0.5", "--embedding_model", "minilm-offline", "--device", "cpu"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = read_stage_data(out)
    assert data.column_names[:3] == ["id", "prompt", "completion"]
    assert list(data["origin"]).count("distilled") == 5 and len(data) == 10
    args[args.index("--total") + 1] = "100"
    bad = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "not enough rows" in bad.stderr and "Traceback" not in bad.stderr


# -- the core, in memory, with precomputed vectors (no files, no model) ---------------------------
def _vec_rows(prefix: str, vecs: list[list[float]], long_tail: list[float] | None = None) -> Dataset:
    n = len(vecs)
    cols = {
        "id": [f"{prefix}{i}" for i in range(n)],
        "prompt": [f"{prefix} prompt {i}" for i in range(n)],
        "completion": [f"{prefix} answer {i}" for i in range(n)],
        "source": ["s"] * n,
        "embedding": vecs,
    }
    if long_tail is not None:
        cols["long_tail"] = long_tail
    return Dataset.from_dict(cols)


def test_mix_rows_core_uses_the_embedding_column_and_removes_near_duplicates():
    from lmmixup_hf.stages.mix import mix_rows

    orig = _vec_rows("o", [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # d0 duplicates o0 (removed: originals win), d1 is the rarest, d2 duplicates d1 (the lower-ranked goes)
    dist = _vec_rows(
        "d", [[1, 0.01, 0], [0.6, 0.8, 0.0], [0.6, 0.8, 0.001], [0, 0.6, 0.8]], long_tail=[0.9, 0.8, 0.7, 0.1]
    )
    mixed, stats = mix_rows(orig, dist, total=4, ratio=0.5, dedup_threshold=0.95, seed=0)
    by_origin = {o: sorted(r["id"] for r in mixed if r["origin"] == o) for o in ("original", "distilled")}
    assert by_origin == {"original": ["o0", "o1"], "distilled": ["d1", "d3"]}
    assert stats["counts"]["dedup_removed_distilled"] == 2 and stats["shortfall"] == {}
    again, _ = mix_rows(orig, dist, total=4, ratio=0.5, dedup_threshold=0.95, seed=0)
    assert again["id"] == mixed["id"]  # deterministic for a seed


def test_mix_rows_core_errors_and_allow_fewer():
    from lmmixup_hf.stages.mix import mix_rows

    orig, dist = _vec_rows("o", [[1, 0]]), _vec_rows("d", [[0, 1]], long_tail=[0.5])
    with pytest.raises(LmmixupError, match="not enough rows"):
        mix_rows(orig, dist, total=4, ratio=0.5)
    mixed, stats = mix_rows(orig, dist, total=4, ratio=0.5, allow_fewer=True)
    assert len(mixed) == 2 and stats["shortfall"] == {"original": 1, "distilled": 1}
    with pytest.raises(LmmixupError, match="embedding"):
        mix_rows(orig.remove_columns("embedding"), dist, total=2, ratio=0.5)
