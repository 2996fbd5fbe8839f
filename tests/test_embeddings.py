"""The Embedder caches on disk: a second encode of the same texts never calls the model."""

import numpy as np

from lmmixup_hf.embed.embeddings import Embedder, get_embedder

TEXTS = ["The Eiffel Tower is in Paris.", "Water boils at 100 C.", "The Eiffel Tower is in Paris."]


def test_second_encode_hits_the_cache(embedder, tmp_path, monkeypatch):
    first = embedder.encode(TEXTS)
    assert embedder.n_encoded == 2  # duplicates are encoded once
    np.testing.assert_array_equal(first[0], first[2])

    fresh = Embedder("minilm-offline", device="cpu", cache=tmp_path / "emb-cache", show_progress=False)

    def boom(*a, **k):
        raise AssertionError("the model must not be called on a cache hit")

    monkeypatch.setattr(fresh, "_encode_uncached", boom)
    again = fresh.encode(TEXTS)
    np.testing.assert_array_equal(first, again)
    assert fresh._model is None  # not even loaded


def test_partial_cache_only_encodes_new_texts(embedder):
    embedder.encode(TEXTS[:1])
    embedder.encode(TEXTS + ["Something new."])
    assert embedder.n_encoded == 3
    assert len(embedder.cache) == 3


def test_no_cache_and_shared_instances(minilm_path):
    e = Embedder("minilm-offline", device="cpu", cache=False, show_progress=False)
    v = e.encode(["hello"])
    assert v.shape == (1, 384) and e.cache is None
    assert get_embedder("minilm-offline", device="cpu") is get_embedder("minilm-offline", device="cpu")
    assert e.encode([]).shape == (0, 384)
