"""The one definition of high/low quality, as a core over an in-memory Dataset (no files)."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from lmmixup_hf.data.quality import high_quality_mask, rating_scores, split_by_quality
from lmmixup_hf.data.schema import LmmixupError


def rated(scores, expected=None) -> Dataset:
    expected = expected or [None] * len(scores)
    ratings = [None if s is None else {"score": s, "expected": e} for s, e in zip(scores, expected)]
    return Dataset.from_dict({"id": [f"r{i}" for i in range(len(scores))], "rating": ratings})


def test_threshold_split_keeps_unscored_apart():
    ds = rated([5, 3, None, 4, 0])
    parts = split_by_quality(ds, threshold=4)
    assert parts.high["id"] == ["r0", "r3"] and parts.low["id"] == ["r1", "r4"]
    assert parts.unscored.tolist() == [2]
    assert len(parts.high) + len(parts.low) + len(parts.unscored) == len(ds)
    assert np.isnan(rating_scores(ds)[2])


def test_threshold_is_the_configured_one():
    ds = rated([5, 3, 2, 4])
    assert split_by_quality(ds, threshold=3).high["id"] == ["r0", "r1", "r3"]
    assert split_by_quality(ds, threshold=5).high["id"] == ["r0"]


def test_top_share_ranks_by_score_then_expected_then_position():
    ds = rated([1, 2, 1, 1, None, 2], expected=[1.9, 2.0, 1.2, 1.9, None, 2.5])
    parts = split_by_quality(ds, top_share=0.6)  # 3 of the 5 scored rows
    assert parts.high["id"] == ["r0", "r1", "r5"]  # r5 (2, 2.5), r1 (2, 2.0), then r0 before r3 (tie)
    assert parts.low["id"] == ["r2", "r3"] and parts.unscored.tolist() == [4]


def test_mask_and_errors():
    assert high_quality_mask(np.array([4.0, np.nan, 3.0])).tolist() == [True, False, False]
    with pytest.raises(LmmixupError, match="top_share"):
        high_quality_mask(np.array([1.0]), top_share=2.0)
    with pytest.raises(LmmixupError, match="no `rating` column"):
        split_by_quality(Dataset.from_dict({"id": ["a"]}))
