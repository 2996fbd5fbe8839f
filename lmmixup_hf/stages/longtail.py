"""The longtail core: the kNN rarity score, mean cosine distance to the k nearest neighbours.

``long_tail_raw = mean_j (1 - cos(x, x_j))`` over the k = 15 nearest rows (self excluded), then
min-max normalised into ``long_tail``; larger means rarer. Two normalisation modes:

- ``joint`` (default): with ``--reference``, the input rows are scored against the reference set
  (e.g. distilled rows against the original high-quality rows) and the reference rows against
  themselves, and one min-max covers both, so the two sets share one scale and can be ranked
  together;
- ``per_file``: every set is scored against itself and normalised on its own, as the method's
  script does (kept for fidelity; scores of two files are then not comparable).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from lmmixup_hf.data.schema import LONG_TAIL, LmmixupError
from lmmixup_hf.embed.neighbors import AnnCheck, checked_knn, knn, resolve_device
from lmmixup_hf.execution.base import Executor, Part, Shared, vector_column, vectors
from lmmixup_hf.options import Options, resolve

logger = logging.getLogger(__name__)

LONG_TAIL_RAW = "long_tail_raw"
DEFAULT_K = 15
REFERENCE_SPLIT = "reference"

# exact top-k cosine similarities ``(n, k)`` of the queries to the keys (None: to themselves, own row
# excluded); an executor may run it elsewhere (e.g. Ray workers sharing the keys)
Search = Callable[[np.ndarray, np.ndarray | None, int], np.ndarray]


def long_tail_raw(
    x: np.ndarray,
    k: int = DEFAULT_K,
    *,
    reference: np.ndarray | None = None,
    backend: str = "exact",
    device: str | None = None,
) -> np.ndarray:
    """Mean cosine distance of each row of ``x`` to its k nearest rows of ``reference`` (default:
    ``x`` itself, own row excluded). Rows must be L2-normalised. Exact search runs on ``device``
    (default: cuda when available)."""
    return long_tail_checked(x, k, reference=reference, backend=backend, device=device)[0]


def long_tail_checked(
    x: np.ndarray,
    k: int = DEFAULT_K,
    *,
    reference: np.ndarray | None = None,
    backend: str = "exact",
    seed: int = 0,
    device: str | None = None,
    search: Search | None = None,
) -> tuple[np.ndarray, AnnCheck]:
    """:func:`long_tail_raw` plus what the kNN search did: with an ANN backend, its recall@k and
    score error on a sample of queries against exact search (see :func:`neighbors.checked_knn`)."""

    def exact() -> tuple[np.ndarray, None]:
        if search is not None:
            return search(x, reference, k), None
        if reference is None:
            return self_knn_sims(x, k, device=device), None
        return knn(x, reference, k=k, device=device)[0], None

    sims, _, check = checked_knn(x, reference, k, backend=backend, exact=exact, seed=seed, device=device)  # type: ignore[arg-type]
    if sims.shape[1] == 0:
        return np.zeros(x.shape[0], np.float64), check
    return (1.0 - sims.astype(np.float64)).mean(1), check


def self_knn_sims(x: np.ndarray, k: int = DEFAULT_K, block: int = 2048, device: str | None = None) -> np.ndarray:
    """Exact top-k cosine similarities of every row to the other rows, ``(n, k)`` best first.

    Symmetric blocking: each block pair (i, j >= i) is multiplied once and serves the rows of
    both blocks (the transpose), so the N x N product costs half of a plain all-vs-all search.
    """
    n = x.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), np.float32)
    device = resolve_device(device)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    best = torch.full((n, k), -math.inf, device=device)
    starts = list(range(0, n, block))

    def merge(rows: slice, scores: torch.Tensor) -> None:
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1).values
        best[rows] = torch.topk(torch.cat([best[rows], top], 1), k, dim=1).values

    with torch.inference_mode():
        for i in starts:
            bi = xt[i : i + block]
            for j in starts:
                if j < i:
                    continue
                s = bi @ xt[j : j + block].T
                if i == j:
                    s.fill_diagonal_(-math.inf)
                merge(slice(i, i + block), s)
                if j != i:
                    merge(slice(j, j + block), s.T.contiguous())
    return best.cpu().numpy()


def min_max(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """``(v - lo) / (hi - lo)`` with lo/hi the extremes of ``values`` unless given; 0 if constant."""
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    if len(values) == 0 or hi - lo <= 0:
        return np.zeros(len(values), np.float64)
    return (values - lo) / (hi - lo)


def score_sets(
    x: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    k: int = DEFAULT_K,
    normalize: Literal["joint", "per_file"] = "joint",
    backend: str = "exact",
    checks: dict[str, dict] | None = None,
    device: str | None = None,
    search: Search | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """``((raw, norm) for x, (raw, norm) for reference or None)`` in the chosen mode. ``checks``,
    when given, receives what each kNN search did (backend, measured ANN recall), by search."""
    if normalize not in ("joint", "per_file"):
        raise LmmixupError(f"normalize must be `joint` or `per_file`, got {normalize!r}")

    def scored(name: str, rows: np.ndarray, against: np.ndarray | None = None) -> np.ndarray:
        raw, check = long_tail_checked(rows, k, reference=against, backend=backend, device=device, search=search)
        if checks is not None:
            checks[name] = check.as_dict()
        return raw

    if reference is None:
        raw = scored("input", x)
        return (raw, min_max(raw)), None
    ref_raw = scored("reference", reference)
    if normalize == "per_file":
        raw = scored("input", x)
        return (raw, min_max(raw)), (ref_raw, min_max(ref_raw))
    raw = scored("input_vs_reference", x, reference)
    both = np.concatenate([raw, ref_raw])
    lo, hi = float(both.min()), float(both.max())
    return (raw, min_max(raw, lo, hi)), (ref_raw, min_max(ref_raw, lo, hi))


@dataclass
class LongtailOptions(Options):
    """The long-tail options (``lmmixup longtail`` takes the same ones as flags; its arguments
    dataclass extends this one, so each default is written here only)."""

    k: int = field(
        default=DEFAULT_K, metadata={"help": "Neighbours per row (the method uses 15).", "range": "[1, inf)"}
    )
    normalize: Literal["joint", "per_file"] = field(
        default="joint",
        metadata={"help": "`joint`: one min-max over input and reference; `per_file`: each set on its own."},
    )
    backend: Literal["exact", "partition", "ivf", "hnsw", "auto"] = field(
        default="exact",
        metadata={
            "help": "kNN: exact; partition (k-means cells + neighbour descent, torch), ivf or hnsw (faiss): "
            "effort tuned to reach 0.95 recall@k and 0.01 score error on sampled queries, both recorded in the "
            "manifest; auto (partition only where it is faster than exact and meets both)."
        },
    )


def longtail_rows(
    ds: Dataset,
    embeddings: np.ndarray,
    reference: Dataset | None = None,
    reference_embeddings: np.ndarray | None = None,
    options: LongtailOptions | None = None,
    *,
    device: str | None = None,
    search: Search | None = None,
    **changes: Any,
) -> tuple[Dataset, Dataset | None, dict[str, dict]]:
    """The longtail core: how rare each row is, as the mean cosine distance to its ``k`` nearest
    neighbours (``long_tail_raw``) min-max scaled to 0-1 (``long_tail``).

    Args:
        ds: The rows to score (the distilled rows).
        embeddings: Their ``(len(ds), d)`` unit vectors.
        reference: Rows scored alongside (the original high-quality rows), or None.
        reference_embeddings: Their unit vectors.
        options: The long-tail options (:class:`LongtailOptions`; default their defaults): ``k``
            neighbours per row; ``normalize`` ``joint`` (one min-max over both sets, so their scores
            compare) or ``per_file`` (each set on its own); the kNN ``backend`` (``exact``,
            ``partition``, ``ivf``, ``hnsw``, ``auto``).
        device: Where the search runs (default: cuda when available).
        search: Replaces the exact kNN search (e.g. the Ray executor's); the min-max stays here.
        **changes: Options changed from ``options`` (``k=10``); a bad one raises ``OptionError``.

    Returns:
        ``(scored, reference_scored, checks)``: ``ds`` and ``reference`` with the two columns
        (``reference_scored`` is None without a reference), and what each kNN search did.

    Example:
        >>> import numpy as np
        >>> from datasets import Dataset
        >>> x = np.array([[1, 0], [0.99, 0.14], [0, 1]], np.float32)
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> scored, _, checks = longtail_rows(Dataset.from_dict({"id": ["a", "b", "c"]}), x, k=1)
        >>> np.round(scored["long_tail"], 2).tolist()  # the lone row is the rarest
        [0.0, 0.0, 1.0]
    """
    o = resolve(LongtailOptions, options, changes)
    if (
        reference is not None
        and reference_embeddings is not None
        and reference_embeddings.shape[1] != embeddings.shape[1]
    ):
        raise LmmixupError(
            f"embeddings are {embeddings.shape[1]}-d but the reference's are {reference_embeddings.shape[1]}-d"
        )
    checks: dict[str, dict] = {}
    (raw, norm), ref_scores = score_sets(
        embeddings,
        reference_embeddings if reference is not None else None,
        k=o.k,
        normalize=o.normalize,
        backend=o.backend,
        checks=checks,
        device=device,
        search=search,
    )
    scored_ref = with_scores(reference, *ref_scores) if reference is not None and ref_scores is not None else None
    return with_scores(ds, raw, norm), scored_ref, checks


def with_scores(ds: Dataset, raw: np.ndarray, norm: np.ndarray) -> Dataset:
    """``ds`` with fresh ``long_tail_raw`` and ``long_tail`` columns."""
    ds = ds.remove_columns([c for c in (LONG_TAIL, LONG_TAIL_RAW) if c in ds.column_names])
    return ds.add_column(LONG_TAIL_RAW, raw.astype(np.float64).tolist()).add_column(
        LONG_TAIL, norm.astype(np.float64).tolist()
    )


# -- the batch function: the exact kNN search of a batch of queries, on any executor ----------------
class KnnBatch:
    """Exact top-``k`` similarities of a batch of queries (``row``, ``query`` vectors) against keys
    every worker shares (read once per worker). ``self_search``: the keys are the queries
    themselves, and a row's own match is left out."""

    def __init__(self, keys: Shared, k: int, self_search: bool, device: str | None = None):
        self.keys = keys.get()  # may be read-only (the object store's); it is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.k, self.self_search, self.device = k, self_search, device

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, queries = batch["row"].to_numpy(), vectors(batch["query"])
        if not self.self_search:
            sims = knn(queries, self.keys, self.k, exclude_self=False, device=self.device)[0]
            return pa.table({"row": batch["row"], "sims": vector_column(sims)})
        k = min(self.k, self.keys.shape[0] - 1)
        sims, idx = knn(queries, self.keys, k + 1, exclude_self=False, device=self.device)
        keep = idx != rows[:, None]  # drop the row itself, else the (k+1)-th
        keep[keep.all(1), -1] = False
        return pa.table({"row": batch["row"], "sims": vector_column(sims[keep].reshape(len(rows), k))})


def knn_on(executor: Executor, part: Part) -> Search | None:
    """The ``search`` for :func:`longtail_rows` on ``executor``: None in this process (the core's own
    exact search, which computes each pair of a self-search once), else :class:`KnnBatch` over
    batches of queries with the keys shared once."""
    if executor.in_process:
        return None

    def search(queries: np.ndarray, keys: np.ndarray | None, k: int) -> np.ndarray:
        self_search = keys is None
        k_eff = min(k, (len(queries) - 1) if self_search else len(keys))
        sims = np.zeros((len(queries), max(k_eff, 0)), np.float32)
        if k_eff <= 0 or len(queries) == 0:
            return sims
        shared = executor.share(np.ascontiguousarray(queries if self_search else keys, dtype=np.float32))
        table = pa.table({"row": pa.array(np.arange(len(queries), dtype=np.int64)), "query": vector_column(queries)})
        make = partial(KnnBatch, shared, k_eff, self_search)
        for out in executor.map_batches(make, table, part):
            sims[out["row"].to_numpy()] = vectors(out["sims"])
        return sims

    return search
