"""The Bayes quality library: scored embeddings per task type, plus the neighbour-class
co-occurrence matrix T and the prior p that turn k nearest neighbours into a posterior over scores.

Layout on disk (no pickle): ``<root>/<task>/library.safetensors`` holds ``embeddings`` (N x d
float32), ``scores`` (N int64), ``class_values``, ``T`` and ``p``; ``<root>/<task>/meta.json``
records the embedding model, k_t, counts and the same T / p for reading by eye.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmmixup_hf.data.schema import TASK_TYPES, LmmixupError, normalize_task_type
from lmmixup_hf.embed.neighbors import knn

FORMAT_VERSION = 1
T_SMOOTHING = 0.01  # added to every co-occurrence cell before row normalisation
PRIOR_EPS = 1e-8
LOG_EPS = 1e-12
DEFAULT_K = 16  # neighbours per query at reward time
DEFAULT_K_T = 3  # neighbours per library item when estimating T

_ANSWER_TAIL = re.compile(r"\n\s*Answer\s*:\s*[^\n]*\s*$", re.IGNORECASE)


def strip_answer_line(text: str) -> str:
    """mcq/tfq library texts are embedded without their trailing ``Answer: ...`` line."""
    return _ANSWER_TAIL.sub("", text)


def library_text(task_type: str, text: str) -> str:
    """The text a library item is embedded from (the same builder applies to completions)."""
    text = text.strip()
    return strip_answer_line(text).strip() if normalize_task_type(task_type) in ("mcq", "tfq") else text


@dataclass
class TaskLibrary:
    """One task's library. ``posterior`` is vectorised over a batch of query embeddings."""

    task: str
    embedding_model: str
    embeddings: np.ndarray  # (N, d) float32, L2-normalised
    scores: np.ndarray  # (N,) int64
    class_values: np.ndarray  # (C,) sorted unique scores
    T: np.ndarray  # (C, C): T[i, j] ~ P(neighbour has class j | item has class i)
    p: np.ndarray  # (C,) class prior
    k_t: int = DEFAULT_K_T
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def class_index(self) -> np.ndarray:
        return np.searchsorted(self.class_values, self.scores)

    def neighbour_histogram(self, queries: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
        """H[i, c] = how many of query i's k nearest library items have class c."""
        _, idx = knn(np.asarray(queries, np.float32), self.embeddings, k=k, exclude_self=False)
        return class_histogram(self.class_index[idx], len(self.class_values))

    def posterior(self, queries: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
        """``softmax(log p + H · log Tᵀ)`` for every query at once: (n, C)."""
        return posterior_from_histogram(self.neighbour_histogram(queries, k), self.T, self.p)

    def expected_score(self, posterior: np.ndarray) -> np.ndarray:
        return posterior @ self.class_values.astype(np.float64)

    def mass_at_least(self, posterior: np.ndarray, threshold: float) -> np.ndarray:
        return posterior[:, self.class_values >= threshold].sum(axis=1)


def class_histogram(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Row-wise counts of class indices ``(n, k) -> (n, C)`` without a Python loop."""
    n = classes.shape[0]
    flat = (np.arange(n)[:, None] * n_classes + classes).ravel()
    return np.bincount(flat, minlength=n * n_classes).reshape(n, n_classes).astype(np.float64)


def posterior_from_histogram(H: np.ndarray, T: np.ndarray, p: np.ndarray) -> np.ndarray:
    logits = np.log(p + LOG_EPS)[None, :] + H @ np.log(T + LOG_EPS).T
    logits -= logits.max(axis=1, keepdims=True)
    post = np.exp(logits)
    return post / post.sum(axis=1, keepdims=True)


def transition_neighbours(embeddings: np.ndarray, k_t: int = DEFAULT_K_T) -> np.ndarray:
    """Each item's k_t voting neighbours (``-1`` pads rows of tiny libraries), as the reference's
    builder picks them: the k_t + 1 nearest items, the item itself included, minus the first one.

    Without duplicates the first one is the item itself, so the votes are its k_t nearest other
    items. Duplicate texts (identical embeddings) are all at distance 0 from each other, tied with
    the item itself: every member of such a group sees the same list, led by the group in index
    order, and drops its first member, so the other members vote for themselves (the builder
    assumes position 0 is the item). This is the rule in exact arithmetic; in float32 the
    reference's own distances of duplicates sometimes round to 6e-8 instead of 0, which depends on
    the BLAS kernel and is not reproducible across machines. Computed on the unique embeddings,
    each group expanded to its members, so no Python loop runs over items.
    """
    emb = np.ascontiguousarray(embeddings, np.float32)
    n = emb.shape[0]
    if n == 0 or k_t <= 0:
        return np.full((n, 0), -1, np.int64)
    uniq, group = np.unique(emb, axis=0, return_inverse=True)
    group = group.reshape(-1)
    n_u, width = uniq.shape[0], k_t + 1
    # members of each group in index order, the first k_t + 1 of them (-1 padded)
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(n_u))
    rank = np.arange(n) - starts[group[order]]
    members = np.full((n_u, width), -1, np.int64)
    keep = rank < width
    members[group[order][keep], rank[keep]] = order[keep]
    # the group itself, then its nearest other groups, each expanded to its members
    if n_u > 1:
        _, nbr = knn(uniq, k=min(k_t, n_u - 1), exclude_self=True)
    else:
        nbr = np.zeros((1, 0), np.int64)
    candidates = np.concatenate([members[:, None, :], members[nbr]], axis=1).reshape(n_u, -1)
    compact = np.argsort(candidates < 0, axis=1, kind="stable")[:, :width]  # valid entries first, in order
    lists = np.take_along_axis(candidates, compact, axis=1)
    if lists.shape[1] < width:
        lists = np.pad(lists, ((0, 0), (0, width - lists.shape[1])), constant_values=-1)
    return lists[group, 1:]


def estimate_transition(embeddings: np.ndarray, scores: np.ndarray, k_t: int = DEFAULT_K_T):
    """Classes, T and p from the library itself: each item's k_t voting neighbours
    (:func:`transition_neighbours`) add ``Cnt[class(item), class(neighbour)] += 1`` over a
    0.01-smoothed table, rows normalised."""
    scores = np.asarray(scores, np.int64)
    class_values = np.unique(scores)
    C = len(class_values)
    cls = np.searchsorted(class_values, scores)
    counts = np.full((C, C), T_SMOOTHING, dtype=np.float64)
    if len(scores) > 1 and k_t > 0:
        idx = transition_neighbours(embeddings, k_t)
        rows = np.repeat(cls, idx.shape[1])
        flat = idx.ravel()
        valid = flat >= 0
        np.add.at(counts, (rows[valid], cls[flat[valid]]), 1.0)
    T = counts / counts.sum(axis=1, keepdims=True)
    n_c = np.bincount(cls, minlength=C).astype(np.float64)
    p = (n_c + PRIOR_EPS) / (n_c + PRIOR_EPS).sum()
    return class_values, T, p


def build_task_library(
    task: str, embeddings: np.ndarray, scores: np.ndarray, embedding_model: str, k_t: int = DEFAULT_K_T
) -> TaskLibrary:
    task = normalize_task_type(task)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.int64)
    if embeddings.ndim != 2 or embeddings.shape[0] != scores.shape[0] or len(scores) == 0:
        raise LmmixupError(f"library {task}: need a non-empty (N, d) embedding matrix and N scores")
    class_values, T, p = estimate_transition(embeddings, scores, k_t)
    return TaskLibrary(task, embedding_model, embeddings, scores, class_values, T, p, k_t)


# -- storage -------------------------------------------------------------------------------------
def save_library(libraries: Mapping[str, TaskLibrary], root: str | Path, extra_meta: Mapping[str, Any] | None = None):
    from safetensors.numpy import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for task, lib in libraries.items():
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "embeddings": lib.embeddings,
            "scores": lib.scores,
            "class_values": lib.class_values.astype(np.int64),
            "T": lib.T.astype(np.float64),
            "p": lib.p.astype(np.float64),
        }
        tmp = folder / f".library-{uuid.uuid4().hex[:8]}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / "library.safetensors")
        meta = {
            "format_version": FORMAT_VERSION,
            "task": task,
            "embedding_model": lib.embedding_model,
            "dim": int(lib.embeddings.shape[1]),
            "n_items": int(lib.embeddings.shape[0]),
            "k_t": lib.k_t,
            "k_default": DEFAULT_K,
            "metric": "cosine",
            "class_values": lib.class_values.tolist(),
            "class_counts": np.bincount(lib.class_index, minlength=len(lib.class_values)).tolist(),
            "T": lib.T.tolist(),
            "p": lib.p.tolist(),
            **dict(extra_meta or {}),
        }
        tmp = folder / f".meta-{uuid.uuid4().hex[:8]}.json"
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, folder / "meta.json")


def load_task_library(folder: str | Path, embedding_model: str | None = None) -> TaskLibrary:
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta_path, data_path = folder / "meta.json", folder / "library.safetensors"
    if not meta_path.exists() or not data_path.exists():
        raise LmmixupError(f"{folder}: not a quality library (needs meta.json and library.safetensors)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if embedding_model is not None and meta.get("embedding_model") != embedding_model:
        raise LmmixupError(
            f"{meta_path}: library was built with embedding model {meta.get('embedding_model')!r} but the reward "
            f"uses {embedding_model!r}; rebuild the library or set the same embedding model"
        )
    t = load_file(str(data_path))
    return TaskLibrary(
        task=meta["task"],
        embedding_model=meta["embedding_model"],
        embeddings=t["embeddings"].astype(np.float32, copy=False),
        scores=t["scores"].astype(np.int64, copy=False),
        class_values=t["class_values"],
        T=t["T"],
        p=t["p"],
        k_t=int(meta.get("k_t", DEFAULT_K_T)),
        meta=meta,
    )


def load_library(root: str | Path, embedding_model: str | None = None) -> dict[str, TaskLibrary]:
    """Every task library under ``root`` (a folder per task type; missing tasks are simply absent)."""
    root = Path(root)
    if not root.is_dir():
        raise LmmixupError(f"quality library {root} does not exist")
    libs = {}
    for task in TASK_TYPES:
        if (root / task / "meta.json").exists():
            libs[task] = load_task_library(root / task, embedding_model)
    if not libs:
        raise LmmixupError(f"{root}: no task libraries found (expected sub-folders among {', '.join(TASK_TYPES)})")
    return libs
