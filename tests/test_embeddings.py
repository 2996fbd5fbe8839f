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

    monkeypatch.setattr(fresh, "encode_uncached", boom)
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


LONG = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. " * 8


def test_another_max_seq_length_is_not_served_from_the_cache(minilm_path, tmp_path):
    """The cache file is chosen by what changes the vectors: a text embedded with another
    ``max_seq_length`` (or normalisation) is encoded again, never answered with the stale vector."""
    cache = tmp_path / "emb-cache"
    short = Embedder("minilm-offline", device="cpu", cache=cache, max_seq_length=16, show_progress=False)
    first = short.encode([LONG])
    longer = Embedder("minilm-offline", device="cpu", cache=cache, max_seq_length=128, show_progress=False)
    second = longer.encode([LONG])
    assert longer.n_encoded == 1  # a miss: not served from the max_seq_length=16 entry
    assert float(first[0] @ second[0]) < 0.999  # the vectors really differ
    raw = Embedder(
        "minilm-offline", device="cpu", cache=cache, max_seq_length=16, normalize=False, show_progress=False
    )
    raw.encode([LONG])
    assert raw.n_encoded == 1
    again = Embedder("minilm-offline", device="cpu", cache=cache, max_seq_length=16, show_progress=False)
    np.testing.assert_array_equal(again.encode([LONG]), first)
    assert again.n_encoded == 0 and again._model is None  # the same settings: a hit, no model loaded
    assert len(list(cache.glob("*.sqlite"))) == 3


def test_a_changed_local_model_gets_its_own_cache(tmp_path):
    from lmmixup_hf.embed.embeddings import cache_file_name, model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"v1")
    before = model_fingerprint(str(model))
    name = cache_file_name(str(model), normalize=True, max_seq_length=None)
    weights.write_bytes(b"v2-retrained")
    assert model_fingerprint(str(model)) != before
    assert cache_file_name(str(model), normalize=True, max_seq_length=None) != name
    assert cache_file_name(str(model), normalize=True, max_seq_length=64) != cache_file_name(
        str(model), normalize=True, max_seq_length=None
    )


def test_embedding_column_is_read_from_arrow_and_bad_vectors_name_the_row(tmp_path):
    """An `embedding` column is used as is (normalised); a missing, ragged, NaN or zero vector is
    one clear error naming the row, never a silent zero or a mis-shaped matrix."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from lmmixup_hf.data.io import read_pool
    from lmmixup_hf.data.schema import LmmixupError
    from lmmixup_hf.embed.embeddings import precomputed_embeddings

    def pool(vectors: list) -> object:
        n = len(vectors)
        table = pa.table(
            {
                "id": [f"r{i}" for i in range(n)],
                "prompt": [f"p{i}" for i in range(n)],
                "completion": ["c"] * n,
                "embedding": pa.array(vectors, pa.list_(pa.float64())),
            }
        )
        pq.write_table(table, tmp_path / "pool.parquet")
        return read_pool(tmp_path / "pool.parquet")

    x = precomputed_embeddings(pool([[3.0, 4.0], [0.0, 2.0]]))
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    cases = [
        ([[1.0, 0.0], None], "row 'r1': field 'embedding': no embedding"),
        ([[1.0, 0.0], [1.0, 0.0], [1.0]], "row 'r2': field 'embedding': an embedding of length 1; expected 2"),
        ([[1.0, 0.0], [float("nan"), 1.0]], "row 'r1': field 'embedding': non-finite or zero vector"),
        ([[0.0, 0.0], [1.0, 1.0]], "row 'r0': field 'embedding': non-finite or zero vector"),
    ]
    for vectors, message in cases:
        with pytest.raises(LmmixupError, match=message):
            precomputed_embeddings(pool(vectors))
