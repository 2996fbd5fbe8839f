"""The mix core: original high-quality rows plus the rarest distilled rows, at a stated ratio.

``total`` rows, of which ``round(total * ratio)`` are distilled (ranked by ``long_tail``, highest
first) and the rest original (ranked by rating score, then ``long_tail``, when those columns
exist; otherwise in input order). Near-duplicates (cosine >= ``dedup_threshold``) are removed
across both sets while the mix is filled: original rows are taken first and win over distilled
ones, and inside a set the higher-ranked row wins. A removed row is always a near-duplicate of a
row that is in the output. If too few rows remain for the requested size and ratio the stage
stops with an error that gives the counts (``--allow_fewer`` writes the smaller mix instead and
records the shortfall in the manifest). The mix is shuffled with ``seed`` and written both as
TRL prompt-completion (``data/``) and as conversational ``messages`` (``messages/``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, Value

from lmmixup_hf.data.io import arrow_dataset
from lmmixup_hf.data.quality import rating_field
from lmmixup_hf.data.schema import COMPLETION, ID, LONG_TAIL, PROMPT, RATING, SOURCE, LmmixupError, text_of
from lmmixup_hf.embed.embeddings import precomputed_embeddings
from lmmixup_hf.options import Options, resolve

logger = logging.getLogger(__name__)

ORIGIN = "origin"
MESSAGES = "messages"
KEEP_COLUMNS = (ID, PROMPT, COMPLETION, SOURCE)
MIX_FEATURES = Features(
    {**{c: Value("string") for c in KEEP_COLUMNS}, LONG_TAIL: Value("float64"), ORIGIN: Value("string")}
)


def greedy_dedup(
    x: np.ndarray, quota: int, threshold: float, kept: np.ndarray | None = None, block: int = 4096
) -> np.ndarray:
    """Walk the rows of ``x`` in order and keep a row unless its cosine to an already kept row (or
    to a row of ``kept``) is >= ``threshold``; stop after ``quota`` rows. Returns the kept indices.

    Blocked: each block is compared with the kept rows in one matmul; only rows with an earlier
    near-duplicate inside the block are resolved one by one.
    """
    d = x.shape[1]
    kept_vecs = torch.from_numpy(np.ascontiguousarray(kept if kept is not None else np.zeros((0, d)), np.float32))
    out: list[np.ndarray] = []
    n_out = 0
    for start in range(0, x.shape[0], block):
        if n_out >= quota:
            break
        b = torch.from_numpy(np.ascontiguousarray(x[start : start + block], np.float32))
        keep = np.ones(b.shape[0], bool)
        if kept_vecs.shape[0]:
            keep &= ~((b @ kept_vecs.T) >= threshold).any(1).numpy()
        dup = torch.triu((b @ b.T) >= threshold, diagonal=1).numpy()  # dup[i, j]: j is near i, i < j
        for j in np.flatnonzero(dup.any(0)):
            if keep[j] and (dup[:j, j] & keep[:j]).any():
                keep[j] = False
        idx = np.flatnonzero(keep)[: quota - n_out]
        out.append(idx + start)
        n_out += len(idx)
        kept_vecs = torch.cat([kept_vecs, b[torch.from_numpy(idx)]])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _long_tail(ds: Dataset) -> np.ndarray:
    """The ``long_tail`` column as float64, NaN where missing (read from Arrow, no Python per row)."""
    col = ds.select_columns([LONG_TAIL]).with_format("arrow")[: len(ds)].column(LONG_TAIL)
    return np.asarray(pc.fill_null(pc.cast(col, pa.float64()), np.nan).to_numpy(), np.float64)


def rank_original(ds: Dataset) -> np.ndarray:
    """Rating score, then long-tail, both descending, when present; else the input order."""
    keys = []
    if LONG_TAIL in ds.column_names:
        keys.append(-np.nan_to_num(_long_tail(ds), nan=-np.inf))
    if RATING in ds.column_names:
        keys.append(-np.nan_to_num(rating_field(ds, "score"), nan=-1))
    return np.lexsort(keys) if keys else np.arange(len(ds))  # lexsort: last key is the primary one


def rank_distilled(ds: Dataset) -> np.ndarray:
    """Long-tail score, descending (the rarest distilled rows first)."""
    if LONG_TAIL not in ds.column_names:
        raise LmmixupError(f"no `{LONG_TAIL}` column in the distilled rows; score them first with `lmmixup longtail`")
    return np.argsort(-np.nan_to_num(_long_tail(ds), nan=-np.inf), kind="stable")


def _texts(ds: Dataset, order: np.ndarray) -> list[str]:
    prompts, completions = list(ds[PROMPT]), list(ds[COMPLETION])
    return [text_of({PROMPT: prompts[i], COMPLETION: completions[i]}) for i in order]


def _gather(ds: Dataset, order: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows ``order`` of ``ds``'s ``columns``, gathered by Arrow from the (memory-mapped) table."""
    table = ds.data.table.select(columns)
    if ds._indices is not None:  # a selected view: map through its indices
        order = np.asarray(ds._indices.column(0))[order]
    return table.take(pa.array(order, pa.int64()))


def _project(ds: Dataset, order: np.ndarray, origin: str) -> pa.Table:
    """The selected rows in the mix's columns, as Arrow (a column gather, no Python per row)."""
    table = _gather(ds, order, list(KEEP_COLUMNS))
    lt = _long_tail(ds)[order] if LONG_TAIL in ds.column_names else np.full(len(order), np.nan)
    table = table.append_column(LONG_TAIL, pa.array(lt, pa.float64(), mask=np.isnan(lt)))
    table = table.append_column(ORIGIN, pa.array(np.full(len(order), origin, dtype=object), pa.string()))
    return table.cast(MIX_FEATURES.arrow_schema)


@dataclass
class MixOptions(Options):
    """The mix options (``lmmixup mix`` takes the same ones as flags; its arguments dataclass
    extends this one, so each default is written here only)."""

    total: int = field(default=10_000, metadata={"help": "Rows in the mix.", "range": "[1, inf)"})
    ratio: float = field(
        default=0.5,
        metadata={"help": "Share of distilled rows (0.5 = 5/5, 0.7 = mixup7_ori3).", "range": "[0, 1]"},
    )
    dedup_threshold: float | None = field(
        default=0.92,
        metadata={
            "help": "Drop rows with cosine >= this to a kept row (originals win); none = off.",
            "range": "[0, 1]",
        },
    )
    seed: int = field(default=42, metadata={"help": "Shuffle seed.", "range": "[0, inf)"})
    allow_fewer: bool = field(
        default=False, metadata={"help": "Write a smaller mix instead of failing when rows run out."}
    )


def mix_rows(
    original: Dataset,
    distilled: Dataset,
    options: MixOptions | None = None,
    *,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    **changes: Any,
) -> tuple[Dataset, dict[str, Any]]:
    """The mix as a core: ``total`` rows, ``round(total * ratio)`` of them distilled (the rarest
    first), near-duplicates removed (originals win), shuffled with ``seed``.

    Args:
        original: The original high-quality rows.
        distilled: The distilled rows, with a ``long_tail`` score.
        options: The mix options (:class:`MixOptions`; default their defaults): ``total`` rows in
            the mix, ``ratio`` share of distilled rows, ``dedup_threshold`` cosine above which a row
            is a near-duplicate (None: no dedup), shuffle ``seed``, ``allow_fewer`` (write fewer
            rows when either side runs out, instead of an error).
        embed: ``embed(texts) -> unit vectors`` for the dedup, when the inputs carry no
            ``embedding`` column.
        **changes: Options changed from ``options`` (``total=100, ratio=0.5``); a bad one raises
            ``OptionError``.

    Returns:
        ``(mixed, stats)``: the rows with their ``origin``, and the counts (and any shortfall).

    Raises:
        LmmixupError: When rows run out and ``allow_fewer`` is not set.

    Example:
        >>> import numpy as np
        >>> from lmmixup_hf.data.io import normalize
        >>> original, _ = normalize([{"prompt": "What is DNA?", "completion": "A molecule."},
        ...                          {"prompt": "Name a prime.", "completion": "7"}])
        >>> distilled, _ = normalize([{"prompt": "Why is the sky blue?", "completion": "Rayleigh scattering."},
        ...                           {"prompt": "What is DNA?", "completion": "A molecule."}])
        >>> distilled = distilled.add_column("long_tail", [0.4, 0.9])
        >>> def letters(texts):  # a toy embedding: letter counts
        ...     v = np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz?. "] for t in texts], float)
        ...     return v / np.linalg.norm(v, axis=1, keepdims=True)
        >>> mixed, stats = mix_rows(original, distilled, total=2, ratio=0.5, embed=letters)
        >>> sorted(zip(mixed["origin"], mixed["prompt"]))  # the distilled copy of an original is dropped
        [('distilled', 'Why is the sky blue?'), ('original', 'What is DNA?')]
    """
    o = resolve(MixOptions, options, changes)
    total, ratio, dedup_threshold, seed, allow_fewer = o.total, o.ratio, o.dedup_threshold, o.seed, o.allow_fewer
    n_dist = round(total * ratio)
    n_orig = total - n_dist
    o_rank, d_rank = rank_original(original), rank_distilled(distilled)
    if (len(original) < n_orig or len(distilled) < n_dist) and not allow_fewer:  # fail before embedding
        raise LmmixupError(
            f"not enough rows for total={total} at ratio={ratio} (original: need {n_orig}, have "
            f"{len(original)}; distilled: need {n_dist}, have {len(distilled)}); lower --total, change --ratio "
            "or pass --allow_fewer"
        )

    if dedup_threshold is None:
        o_sel, d_sel = o_rank[:n_orig], d_rank[:n_dist]
        o_dups = d_dups = 0
    else:
        ox = _vectors(original, o_rank, embed)
        o_keep = greedy_dedup(ox, n_orig, dedup_threshold)
        o_sel = o_rank[o_keep]
        o_dups = _scanned(o_keep, len(o_rank), n_orig) - len(o_keep)
        dx = _vectors(distilled, d_rank, embed)
        d_keep = greedy_dedup(dx, n_dist, dedup_threshold, kept=ox[o_keep])
        d_sel = d_rank[d_keep]
        d_dups = _scanned(d_keep, len(d_rank), n_dist) - len(d_keep)

    wanted = (("original", n_orig, o_sel), ("distilled", n_dist, d_sel))
    missing = {name: (want, len(got)) for name, want, got in wanted if len(got) < want}
    if missing:
        detail = "; ".join(f"{k}: need {w}, have {h}" for k, (w, h) in missing.items())
        msg = (
            f"not enough rows for total={total} at ratio={ratio} ({detail}; near-duplicates removed: "
            f"{o_dups} original, {d_dups} distilled)"
        )
        if not allow_fewer:
            raise LmmixupError(msg + "; lower --total, change --ratio or pass --allow_fewer")
        logger.warning("mix: %s; writing %d rows", msg, len(o_sel) + len(d_sel))

    both = pa.concat_tables([_project(original, o_sel, "original"), _project(distilled, d_sel, "distilled")])
    mixed = arrow_dataset(both.take(pa.array(np.random.default_rng(seed).permutation(both.num_rows))))
    counts = {
        "rows": len(mixed),
        "original": len(o_sel),
        "distilled": len(d_sel),
        "dedup_removed_original": o_dups,
        "dedup_removed_distilled": d_dups,
    }
    return mixed, {"counts": counts, "shortfall": {k: w - h for k, (w, h) in missing.items()}}


def _vectors(ds: Dataset, order: np.ndarray, embed: Callable[[list[str]], np.ndarray] | None) -> np.ndarray:
    """Unit vectors of ``ds``'s rows in ``order``: its ``embedding`` column, or ``embed`` on the texts."""
    x = precomputed_embeddings(ds) if len(order) else None  # every row's, checked, then ranked
    if x is not None:
        return x[order]
    if embed is None:
        raise LmmixupError("dedup needs an `embedding` column or an embedding model")
    return embed(_texts(ds, order))


def to_messages(mixed: Dataset) -> Dataset:
    """The conversational form of a mix (TRL's ``messages``), built as Arrow list<struct> columns."""
    table = mixed.with_format("arrow")[: len(mixed)]
    n = table.num_rows
    roles = pa.array(np.tile(np.array(["user", "assistant"], dtype=object), n), pa.string())
    contents = (
        pc.take(
            pa.concat_arrays([table.column(PROMPT).combine_chunks(), table.column(COMPLETION).combine_chunks()]),
            pa.array(np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)),
        )
        if n
        else pa.array([], pa.string())
    )
    turns = pa.StructArray.from_arrays([roles, contents], names=["role", "content"])
    messages = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turns)
    return arrow_dataset(table.drop_columns([PROMPT, COMPLETION]).append_column(MESSAGES, messages))


def _scanned(keep: np.ndarray, n: int, quota: int) -> int:
    """How many ranked rows the dedup walked through: up to the last kept row when the quota was
    met, else all of them (so 'scanned - kept' is the number of near-duplicates removed)."""
    if quota <= 0:
        return 0
    return int(keep[-1]) + 1 if len(keep) >= quota else n
