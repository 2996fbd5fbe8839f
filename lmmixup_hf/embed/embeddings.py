"""One ``Embedder`` over sentence-transformers: batched, L2-normalised float32, cached on disk.

The cache (a :class:`~lmmixup_hf.models.kvstore.KVStore`) is a SQLite file per model and settings,
keyed by a hash of the text, so a rerun (or another stage embedding the same rows) never encodes a
text twice, and a crash loses at most one chunk. The file is chosen by everything that changes the
vectors: the model's files (a local folder's file sizes and times, or the Hub revision),
``max_seq_length`` and normalisation; so a changed model or setting never returns stale vectors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from lmmixup_hf.execution.base import Executor, Part, vector_column, vectors
from lmmixup_hf.models.kvstore import KVStore
from lmmixup_hf.models.registry import DEFAULT_EMBEDDING_MODEL, cache_root, resolve_model

logger = logging.getLogger(__name__)


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def embedding_cache_root() -> Path:
    """``$LMMIXUP_EMBEDDING_CACHE`` or ``<cache root>/embeddings``."""
    env = os.environ.get("LMMIXUP_EMBEDDING_CACHE")
    return Path(env) if env else cache_root() / "embeddings"


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class EmbeddingCache:
    """``text hash -> float32 vector`` for one model and its settings, in a :class:`KVStore`."""

    def __init__(self, path: str | Path):
        self.store = KVStore(path, "emb")
        self.path = self.store.path

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of ``keys`` (missing keys are left out)."""
        return {k: np.frombuffer(v, dtype=np.float32) for k, v in self.store.get_many(keys).items()}

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Cache vectors (buffered, see :class:`KVStore`)."""
        self.store.put_many((k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in zip(keys, vectors))

    def flush(self) -> None:
        """Commit the buffered vectors."""
        self.store.flush()

    def __len__(self) -> int:
        return len(self.store)


def model_fingerprint(model: str) -> str:
    """What identifies a model's weights without loading them: for a local folder, the names, sizes
    and modification times of its files; for a Hub id, the revision of its local snapshot (the id
    alone when it is not downloaded yet)."""
    path = Path(model).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        stats = [f"{f.relative_to(path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
        return "dir:" + hashlib.sha1("\n".join(stats).encode("utf-8")).hexdigest()
    try:
        from huggingface_hub import snapshot_download

        return "rev:" + Path(snapshot_download(model, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not in the local Hub cache: keyed by the id until it is
        return "hub:" + model


def cache_file_name(model_id: str, *, normalize: bool, max_seq_length: int | None) -> str:
    """``<model>-<hash>.sqlite``: the hash covers the model's fingerprint, ``max_seq_length`` and
    normalisation, everything that changes the vectors of a text."""
    settings = f"{model_fingerprint(resolve_model(model_id))}|max_seq_length={max_seq_length}|normalize={normalize}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "__", model_id)
    return f"{safe}-{hashlib.sha1(settings.encode('utf-8')).hexdigest()[:16]}.sqlite"


@runtime_checkable
class TextEmbedder(Protocol):
    """What the stages and executors need of an embedder: unit float32 vectors for texts, a count
    of the texts the model really encoded (the cache's misses) and ``flush()``. :class:`Embedder`
    is one; the Ray executor's embedder (same cache, misses encoded on actors) is another."""

    n_encoded: int

    def encode(self, texts: Sequence[str], desc: str = "embedding") -> np.ndarray:
        """An ``(n, d)`` float32 array in the order of ``texts``."""
        ...

    def flush(self) -> None:
        """Commit anything the cache still buffers."""
        ...


class Embedder:
    """Encode texts into L2-normalised float32 vectors, with an on-disk cache.

    ``model_id`` is a Hub id, a local folder or the ``minilm-offline`` alias. ``cache`` is
    ``True`` (the default cache folder), ``False`` (no cache) or a folder.
    """

    def __init__(
        self,
        model_id: str = DEFAULT_EMBEDDING_MODEL,
        *,
        device: str | None = None,
        batch_size: int = 64,
        normalize: bool = True,
        cache: bool | str | Path = True,
        max_seq_length: int | None = None,
        show_progress: bool = True,
    ):
        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        self.show_progress = show_progress
        self.n_encoded = 0  # texts actually sent through the model (the cache's misses)
        self._model = None
        self._lock = threading.Lock()
        if cache is False:
            self.cache = None
        else:
            root = embedding_cache_root() if cache is True else Path(cache)
            name = cache_file_name(model_id, normalize=normalize, max_seq_length=max_seq_length)
            self.cache = EmbeddingCache(root / name)

    @property
    def model(self):
        """The sentence-transformers model, loaded on first use (so cache hits never load it)."""
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                device = self.device or default_device()
                self._model = SentenceTransformer(resolve_model(self.model_id), device=device)
                if self.max_seq_length:
                    self._model.max_seq_length = self.max_seq_length
            return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def encode_uncached(self, texts: list[str]) -> np.ndarray:
        """The model's vectors of ``texts``, cache neither read nor written (e.g. on a worker)."""
        vecs = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        self.n_encoded += len(texts)
        return np.asarray(vecs, dtype=np.float32)

    def encode_missing(self, missing: list[tuple[str, str]], found: dict[str, np.ndarray], desc: str) -> None:
        """Encode the cache's misses ``(key, text)`` into ``found``, committing each chunk to the cache
        as it finishes (a crash loses at most one chunk). The one hook for encoding elsewhere: an
        executor's embedder overrides this and hands each finished batch to :meth:`store`."""
        chunk = self.batch_size * 16
        bar = tqdm(total=len(missing), desc=desc, unit="text", disable=not self.show_progress or len(missing) < chunk)
        for i in range(0, len(missing), chunk):
            part = missing[i : i + chunk]
            vecs = self.encode_uncached([text for _, text in part])
            self.store([key for key, _ in part], vecs, found)
            bar.update(len(part))
        bar.close()

    def store(self, keys: Sequence[str], vecs: np.ndarray, found: dict[str, np.ndarray]) -> None:
        """Record finished vectors: into the cache (committed with the chunk) and into ``found``."""
        if self.cache is not None:
            self.cache.put(list(keys), vecs)
            self.cache.flush()  # a chunk is committed as it finishes: a crash loses at most one
        found.update(zip(keys, vecs))

    def flush(self) -> None:
        """Commit whatever the cache still buffers."""
        if self.cache is not None:
            self.cache.flush()

    def encode(self, texts: Sequence[str], desc: str = "embedding") -> np.ndarray:
        """Return an ``(n, d)`` float32 array in the order of ``texts``."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        keys = [_text_key(t) for t in texts]
        unique: dict[str, str] = dict(zip(keys, texts))
        found = self.cache.get(list(unique)) if self.cache is not None else {}
        missing = [k for k in unique if k not in found]
        if missing:
            self.encode_missing([(k, unique[k]) for k in missing], found, desc)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)


_SHARED: dict[tuple, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def get_embedder(model_id: str = DEFAULT_EMBEDDING_MODEL, **kwargs) -> Embedder:
    """A process-wide :class:`Embedder` per (model, options), so rewards and stages share one
    loaded model.

    Args:
        model_id: A Hub id, a local folder or ``minilm-offline``.
        **kwargs: :class:`Embedder` options (``device``, ``batch_size``, ``cache``, ...).

    Returns:
        The shared embedder; its model loads on the first cache miss.

    Example:
        >>> get_embedder("minilm-offline", device="cpu") is get_embedder("minilm-offline", device="cpu")
        True
    """
    key = (model_id, tuple(sorted(kwargs.items())))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Embedder(model_id, **kwargs)
        return _SHARED[key]


class EncodeTexts:
    """Batch function: ``(key, text)`` rows in, ``(key, vector)`` out, with one model per worker
    (built once; no cache there: the driver's embedder keeps the one cache)."""

    def __init__(self, model_id: str, device: str | None, batch_size: int):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per worker in the driver's log is noise
        self.embedder = Embedder(model_id, device=device, batch_size=batch_size, cache=False, show_progress=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vecs = self.embedder.encode_uncached([str(t) for t in batch["text"].to_pylist()])
        return pa.table({"key": batch["key"], "vector": vector_column(vecs)})


class ExecutorEmbedder(Embedder):
    """The usual embedder (same cache, same vectors) whose cache misses are encoded by
    :class:`EncodeTexts` on an executor's workers; each finished batch goes into the cache, so a
    rerun re-encodes nothing that was done."""

    def __init__(self, executor: Executor, part: Part, model_id: str, **kwargs: Any):
        super().__init__(model_id, **kwargs)
        self.executor, self.part = executor, part

    def encode_missing(self, missing: list[tuple[str, str]], found: dict[str, np.ndarray], desc: str) -> None:
        table = pa.table({"key": [k for k, _ in missing], "text": [t for _, t in missing]})
        make = partial(EncodeTexts, self.model_id, self.device, self.batch_size)
        name = f"{desc} ({self.executor.name})"
        with tqdm(total=len(missing), desc=name, unit="text", disable=not self.show_progress) as bar:
            for out in self.executor.map_batches(make, table, self.part):
                self.store([str(k) for k in out["key"].to_pylist()], vectors(out["vector"]), found)
                self.n_encoded += out.num_rows
                bar.update(out.num_rows)


def embedder_on(
    executor: Executor, part: Part, model_id: str, *, device: str | None, batch_size: int
) -> Embedder | None:
    """The embedder a stage uses on ``executor``: None in this process (the process-wide model of
    :func:`get_embedder`, loaded once for every stage), else an :class:`ExecutorEmbedder`."""
    if executor.in_process:
        return None
    return ExecutorEmbedder(executor, part, model_id, device=device, batch_size=batch_size)


EMBEDDING = "embedding"  # a row's own precomputed vector (list of floats), used instead of the model


def _arrow_vectors(ds) -> np.ndarray:
    """The ``embedding`` column straight from Arrow (no Python float per value), L2-normalised.

    Every row must hold a finite, non-zero vector of one length: a missing, empty, ragged, NaN/inf
    or all-zero vector is a :class:`LmmixupError` naming the first such row's id (never a silent
    zero or a mis-shaped matrix)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lmmixup_hf.data.schema import ID, LmmixupError

    def bad_row(mask: np.ndarray, what: str) -> LmmixupError:
        i = int(np.argmax(mask))
        rid = ds.select([i])[ID][0] if ID in ds.column_names else i + 1
        return LmmixupError(f"row {rid!r}: field {EMBEDDING!r}: {what}")

    if not len(ds):
        return np.zeros((0, 0), np.float32)
    col = ds.select_columns([EMBEDDING]).with_format("arrow")[: len(ds)].column(EMBEDDING).combine_chunks()
    listy = pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)
    if not listy or not (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)):
        raise LmmixupError(f"field {EMBEDDING!r}: expected a list of numbers per row, got Arrow type {col.type}")
    missing = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if missing.any():
        raise bad_row(missing, "no embedding")
    lengths = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int64)
    dims, counts = np.unique(lengths, return_counts=True)
    dim = int(dims[np.argmax(counts)])  # the usual length; the odd rows are the ones named
    if dim == 0 or len(dims) > 1:
        off = lengths != dim if dim else lengths == 0
        raise bad_row(off, f"an embedding of length {int(lengths[np.argmax(off)])}; expected {dim} floats")
    x = np.asarray(pc.cast(pc.list_flatten(col), pa.float32()).to_numpy(zero_copy_only=False)).reshape(len(ds), dim)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = ~np.isfinite(x).all(1) | (norms[:, 0] == 0) | ~np.isfinite(norms[:, 0])
    if bad.any():
        raise bad_row(bad, "non-finite or zero vector")
    return x / norms


def with_embeddings(ds, x: np.ndarray):
    """``ds`` with an ``embedding`` column (float32), so later stages reuse the vectors."""
    import pyarrow as pa

    from lmmixup_hf.data.io import arrow_dataset

    x = np.ascontiguousarray(x, dtype=np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]).cast(pa.list_(pa.float32()))
    table = (
        ds.remove_columns([EMBEDDING]).with_format("arrow")[: len(ds)]
        if EMBEDDING in ds.column_names
        else ds.with_format("arrow")[: len(ds)]
    )
    return arrow_dataset(table.append_column(EMBEDDING, vectors))


def precomputed_embeddings(ds) -> np.ndarray | None:
    """The rows' own ``embedding`` vectors, L2-normalised, or None when no row carries one.

    Read from an ``embedding`` column (stage folders, saved datasets) or, for a plain JSONL/parquet
    pool, from the ``extra`` JSON that keeps unknown fields. Either every row has one of the same
    length with finite values, or it is an error naming the first row that does not.
    """
    import json

    from lmmixup_hf.data.schema import EXTRA, ID, LmmixupError

    if EMBEDDING in ds.column_names:
        return _arrow_vectors(ds)
    if EXTRA in ds.column_names and len(ds) and EMBEDDING in json.loads(ds[0][EXTRA] or "{}"):
        vectors = [None if e is None else json.loads(e).get(EMBEDDING) for e in ds[EXTRA]]
    else:
        return None
    ids = ds[ID]
    dims = {len(v) for v in vectors if isinstance(v, list)}
    for i, v in enumerate(vectors):
        if not isinstance(v, list) or len(v) == 0 or len(v) != max(dims, default=0):
            what = "no embedding" if not isinstance(v, list) else f"an embedding of length {len(v)}"
            raise LmmixupError(f"row {ids[i]!r}: field {EMBEDDING!r}: {what}; expected {max(dims, default=0)} floats")
    try:
        x = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise LmmixupError(f"field {EMBEDDING!r}: not a list of numbers ({e})") from None
    bad = ~np.isfinite(x).all(1) | (np.linalg.norm(x, axis=1) == 0)
    if bad.any():
        raise LmmixupError(f"row {ids[int(np.argmax(bad))]!r}: field {EMBEDDING!r}: non-finite or zero vector")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def row_embeddings(
    ds, model_id: str, *, device: str | None = None, batch_size: int = 64, embedder: TextEmbedder | None = None
) -> np.ndarray:
    """The rows' unit vectors: their own ``embedding`` when they carry one (no model is loaded),
    else the model's embeddings of ``prompt + "\\n" + completion`` (cached on disk).

    Args:
        ds: Rows with ``prompt`` and ``completion`` (and optionally ``embedding``).
        model_id: The embedding model when the rows carry no vectors.
        device: Where the model runs (default: cuda > mps > cpu).
        batch_size: Texts per forward pass.
        embedder: Encode with this one instead (e.g. an executor's, which encodes on a cluster).

    Returns:
        An ``(n, d)`` float32 array of L2-normalised rows, in the order of ``ds``.

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_list([{"id": "a", "prompt": "p", "completion": "c", "embedding": [3.0, 4.0]}])
        >>> row_embeddings(ds, "BAAI/bge-m3")  # the rows' own vector, normalised; no model loaded
        array([[0.6, 0.8]], dtype=float32)
    """
    from lmmixup_hf.data.schema import COMPLETION, PROMPT, text_of

    x = precomputed_embeddings(ds)
    if x is not None:
        logger.info("using the rows' own %r column (%d x %d); no embedding model", EMBEDDING, *x.shape)
        return x
    texts = [text_of({PROMPT: p, COMPLETION: c}) for p, c in zip(ds[PROMPT], ds[COMPLETION])]
    embedder = embedder or get_embedder(model_id, device=device, batch_size=batch_size)
    return embedder.encode(texts)
