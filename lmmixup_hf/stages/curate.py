"""The curate core: how noisy is the judge, and which of its scores does the neighbourhood contradict?

Two steps over rated rows and their embeddings (the DS2 recipe, ICLR 2025):

1. **HOC** estimates the judge's score transition matrix ``T`` (``T[y, r]``: the chance a row whose
   true score is ``y`` is rated ``r``; rows sum to 1) and the clean score prior ``p_clean``. It
   assumes *2-NN clusterability*: a row and its two nearest neighbours share one true score, while
   the judge errs on each independently. The first-, second- and third-order consensus of those
   tuples (how often the rated scores of 1, 2 and 3 such rows take each value) are then functions
   of ``T`` and ``p_clean`` alone, which gradient descent (Adam over softmax parametrisations)
   recovers. The consensus is averaged over ``rounds`` random samples of the rows.
2. **Voting** (SimiFeat-style): each row's own rating and its ``k`` neighbours' ratings are
   evidence about its true score, turned into a posterior through ``T`` and ``p_clean``. A
   neighbour at cosine similarity ``s`` counts as sharing the row's true score with probability
   ``s`` and as an unrelated row (rated like the pool, ``p_rated``) otherwise, so a loose
   neighbourhood moves a score less than a tight one. ``score_error`` is the posterior
   probability that the judge's score is wrong; the curated score is the posterior's mode when it
   is at least ``min_confidence`` likely, else the judge's score stands.

Both steps rest on neighbours sharing true scores. When nearest neighbours share a rated score no
more often than two random rows do (:func:`neighbour_agreement`), the embedding says nothing about
the scores: every score is left as the judge gave it, ``score_error`` is unknown (NaN), and the
diagnosis says so.

Pure functions over arrays (and :func:`curate_rows` over a ``Dataset``): no files, deterministic
for a seed, torch on the given device.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from lmmixup_hf.data.quality import rating_field
from lmmixup_hf.data.schema import RATING, SCORE_MAX, SCORE_MIN
from lmmixup_hf.embed.neighbors import checked_knn, resolve_device

logger = logging.getLogger(__name__)

K = SCORE_MAX - SCORE_MIN + 1  # score classes 0..5
RAW_SCORE = "raw_score"  # the judge's score, kept in the rating struct next to the curated `score`
SCORE_ERROR = "score_error"  # column: the probability that the judge's score is wrong

# DS2's constants: 10 voting neighbours; HOC over 50 rounds of up to 50,000 rows, 1,500 Adam steps at lr 0.1
DEFAULT_K = 10
DEFAULT_ROUNDS = 50
DEFAULT_SAMPLE = 50_000
DEFAULT_STEPS = 1500
DEFAULT_LR = 0.1
_FLOOR = 1e-3  # mixed into T before voting, so one unexpected vote is unlikely, never impossible


# -- HOC: the transition matrix from 2-NN consensus ---------------------------------------------
def consensus(tuples: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-, second- and third-order consensus of ``(m, 3)`` rated-score tuples (a row and its two
    nearest neighbours): the shares ``c1[a]``, ``c2[a, b]`` and ``c3[a, b, c]`` of tuples rated
    ``a``, ``(a, b)`` and ``(a, b, c)``."""
    t = tuples.astype(np.int64)
    code = (t[:, 0] * k + t[:, 1]) * k + t[:, 2]
    c3 = np.bincount(code, minlength=k**3).reshape(k, k, k) / max(1, len(t))
    # the three rows of a tuple are exchangeable under the model: averaging their orderings
    # removes sampling noise only (measured: a closer T on planted data)
    c3 = sum(c3.transpose(p) for p in itertools.permutations(range(3))) / 6
    return c3.sum((1, 2)), c3.sum(2), c3


def sampled_consensus(
    scores: np.ndarray, nbrs: np.ndarray, *, rounds: int, sample_size: int, rng: np.random.Generator, k: int = K
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The consensus of the tuples ``(row, nbrs[:, 0], nbrs[:, 1])``, averaged over ``rounds``
    random samples of ``sample_size`` rows (at most 90 % of them)."""
    tuples = np.stack([scores, scores[nbrs[:, 0]], scores[nbrs[:, 1]]], 1)
    n = len(scores)
    m = max(1, min(sample_size, int(0.9 * n)))
    acc = [np.zeros((k,) * o) for o in (1, 2, 3)]
    for _ in range(rounds):
        for a, c in zip(acc, consensus(tuples[rng.choice(n, m, replace=False)], k)):
            a += c / rounds
    return acc[0], acc[1], acc[2]


def analytic_consensus(T: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the consensus would be under ``T`` and ``p``, the judge erring independently on each row."""
    return (
        torch.einsum("y,ya->a", p, T),
        torch.einsum("y,ya,yb->ab", p, T, T),
        torch.einsum("y,ya,yb,yc->abc", p, T, T, T),
    )


def solve_hoc(
    c: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: str | None = "cpu",
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(T, p_clean, loss)`` that best explain the consensus ``c``: Adam on the sum of the three
    orders' Frobenius errors, over row-softmax logits of ``T`` (started diagonal-heavy, so the
    classes keep their names) and softmax logits of ``p`` (near uniform). The lowest loss wins."""
    device = resolve_device(device)
    k = c[0].shape[0]
    gen = torch.Generator().manual_seed(seed)
    t_logits = (5 * torch.eye(k) - torch.ones(k, k)).to(device).requires_grad_()
    p_logits = (torch.ones(k) / k + 0.1 * torch.rand(k, generator=gen)).to(device).requires_grad_()
    target = [torch.as_tensor(x, dtype=torch.float32, device=device) for x in c]
    opt = torch.optim.Adam([t_logits, p_logits], lr=lr)
    best = (float("inf"), None, None)
    for step in range(steps):
        T, p = torch.softmax(t_logits, 1), torch.softmax(p_logits, 0)
        loss = sum(torch.linalg.norm(a - b) for a, b in zip(analytic_consensus(T, p), target))
        value = loss.item()
        if step > 5 and value < best[0]:
            best = (value, T.detach().clone(), p.detach().clone())
        opt.zero_grad()
        loss.backward()
        opt.step()
    if best[1] is None:  # fewer than 7 steps: the last point
        best = (loss.item(), T.detach(), p.detach())
    return best[1].cpu().double().numpy(), best[2].cpu().double().numpy(), best[0]


# -- voting: a posterior over each row's true score ----------------------------------------------
def vote(
    scores: np.ndarray,
    nbrs: np.ndarray,
    sims: np.ndarray,
    T: np.ndarray,
    p_clean: np.ndarray,
    *,
    device: str | None = "cpu",
    block: int = 65_536,
) -> np.ndarray:
    """``(n, K)`` posterior over each row's true score from its own rating and its neighbours'
    (``nbrs``, ``sims``: ``(n, k)`` from a self-kNN), weighted through ``T`` and ``p_clean``."""
    device = resolve_device(device)
    k = T.shape[0]
    n = len(scores)
    p_rated = np.bincount(scores, minlength=k) / max(1, n)
    Tf = (1 - _FLOOR) * np.asarray(T, np.float64) + _FLOOR / k
    Tf /= Tf.sum(1, keepdims=True)
    by_rating = torch.as_tensor(Tf.T, dtype=torch.float64, device=device)  # [r] -> P(r | y) over y
    pr = torch.as_tensor(p_rated, dtype=torch.float64, device=device)
    prior = torch.log(torch.as_tensor(np.maximum(p_clean, 1e-12), dtype=torch.float64, device=device))
    out = np.empty((n, k))
    for lo in range(0, n, block):
        s = torch.as_tensor(scores[lo : lo + block], device=device)
        nb = torch.as_tensor(scores[nbrs[lo : lo + block]], device=device)
        w = torch.as_tensor(sims[lo : lo + block], dtype=torch.float64, device=device).clamp(0, 1)[..., None]
        lik = w * by_rating[nb] + (1 - w) * pr[nb][..., None]  # (b, k_nbrs, K)
        logp = prior + torch.log(by_rating[s]) + torch.log(lik).sum(1)
        out[lo : lo + block] = torch.softmax(logp, 1).cpu().numpy()
    return out


def neighbour_agreement(scores: np.ndarray, nearest: np.ndarray, z_min: float = 3.0) -> dict[str, Any]:
    """How often a row and its nearest neighbour share a rated score, against chance (two rows drawn
    from the pool, ``sum(p_rated^2)``). Curation rests on neighbours sharing true scores; when they
    agree no more than chance (z < ``z_min``), HOC sees noise it cannot tell from a useless judge
    and the vote would pull every score towards the prior, so ``signal`` is False."""
    n = len(scores)
    observed = float((scores == scores[nearest]).mean())
    p = np.bincount(scores, minlength=K) / n
    chance = float((p**2).sum())
    z = (observed - chance) / max(np.sqrt(chance * (1 - chance) / n), 1e-12)
    return {
        "observed": round(observed, 4),
        "chance": round(chance, 4),
        "z": round(float(z), 2),
        "signal": bool(z >= z_min),
    }


# -- the whole core ---------------------------------------------------------------------------
@dataclass
class Curation:
    """What :func:`curate_scores` found. Arrays are over all input rows; unscored rows keep NaN."""

    curated: np.ndarray  # float64: the curated score (NaN where the row had none)
    raw: np.ndarray  # float64: the judge's score
    score_error: np.ndarray  # float64: P(the judge's score is wrong)
    T: np.ndarray
    p_clean: np.ndarray
    p_rated: np.ndarray
    hoc_loss: float
    knn: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: knn, hoc, vote
    neighbours: dict[str, Any] = field(default_factory=dict)  # :func:`neighbour_agreement`

    @property
    def flagged(self) -> np.ndarray:
        """Rows whose judge score is more likely wrong than right."""
        return np.nan_to_num(self.score_error) >= 0.5

    @property
    def changed(self) -> np.ndarray:
        return ~np.isnan(self.raw) & (self.curated != self.raw)

    def diagnosis(self) -> dict[str, Any]:
        """The JSON-ready summary: ``T``, the priors and the counts."""
        scored = ~np.isnan(self.raw)
        hist = lambda a: np.bincount(a[scored].astype(np.int64), minlength=K).tolist()  # noqa: E731
        return {
            "T": np.round(self.T, 4).tolist(),
            "p_clean": np.round(self.p_clean, 4).tolist(),
            "p_rated": np.round(self.p_rated, 4).tolist(),
            "hoc_loss": round(self.hoc_loss, 6),
            "rows": int(len(self.raw)),
            "scored": int(scored.sum()),
            "unscored": int((~scored).sum()),
            "flagged": int(self.flagged.sum()),
            "changed": int(self.changed.sum()),
            "histogram_raw": hist(self.raw),
            "histogram_curated": hist(self.curated),
            "neighbour_agreement": self.neighbours,
            "knn": self.knn,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def curate_scores(
    x: np.ndarray,
    scores: np.ndarray,
    *,
    k: int = DEFAULT_K,
    rounds: int = DEFAULT_ROUNDS,
    sample_size: int = DEFAULT_SAMPLE,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    min_confidence: float = 0.5,
    seed: int = 0,
    backend: str = "auto",
    device: str | None = "cpu",
) -> Curation:
    """Estimate the judge's ``T`` with HOC and correct its scores by neighbour voting.

    ``x``: ``(n, d)`` L2-normalised embeddings; ``scores``: the judge's scores 0..5 (NaN where it
    gave none: those rows take no part and come back unchanged). One self-kNN of the scored rows
    (the project's :func:`~lmmixup_hf.embed.neighbors.checked_knn`, ``backend`` as there) serves
    both steps: its two nearest neighbours form the HOC tuples, all ``k`` vote."""
    scores = np.asarray(scores, np.float64)
    scored = np.flatnonzero(~np.isnan(scores))
    if len(scored) and (np.any(scores[scored] < SCORE_MIN) or np.any(scores[scored] > SCORE_MAX)):
        raise ValueError(f"scores must be in {SCORE_MIN}..{SCORE_MAX}")
    if len(scored) < 3:
        raise ValueError(f"curation needs at least 3 scored rows, got {len(scored)}")
    s = np.rint(scores[scored]).astype(np.int64) - SCORE_MIN
    t0 = time.perf_counter()
    sims, nbrs, check = checked_knn(
        np.ascontiguousarray(x[scored], np.float32),
        None,
        min(k, len(s) - 1),
        backend=backend,
        seed=seed,
        device=device,
    )
    t1 = time.perf_counter()
    rng = np.random.default_rng(seed)
    c = sampled_consensus(s, nbrs[:, :2], rounds=rounds, sample_size=sample_size, rng=rng)
    T, p_clean, loss = solve_hoc(c, steps=steps, lr=lr, seed=seed, device=device)
    t2 = time.perf_counter()
    post = vote(s, nbrs, sims, T, p_clean, device=device)
    best = post.argmax(1)
    keep = post[np.arange(len(s)), best] < min_confidence
    agreement = neighbour_agreement(s, nbrs[:, 0])
    if not agreement["signal"]:
        logger.warning(
            "curate: nearest neighbours share a score in %.1f%% of rows, no more than chance (%.1f%%): the "
            "embedding says nothing about the scores here, so they are left as the judge gave them",
            100 * agreement["observed"],
            100 * agreement["chance"],
        )
        keep[:] = True
    new = np.where(keep, s, best)
    own = post[np.arange(len(s)), s] if agreement["signal"] else np.full(len(s), np.nan)  # no signal: no estimate
    curated = scores.copy()
    curated[scored] = new + SCORE_MIN
    error = np.full(len(scores), np.nan)
    error[scored] = 1.0 - own
    p_rated = np.bincount(s, minlength=K) / len(s)
    seconds = {"knn": t1 - t0, "hoc": t2 - t1, "vote": time.perf_counter() - t2}
    return Curation(curated, scores, error, T, p_clean, p_rated, loss, check.as_dict(), seconds, agreement)


def curate_rows(ds: Dataset, x: np.ndarray, **kwargs: Any) -> tuple[Dataset, Curation]:
    """:func:`curate_scores` on a rated ``Dataset``: every row comes back, ``rating.score`` curated,
    ``rating.raw_score`` the judge's score (already there: kept, so curating twice starts from the
    judge again) and a ``score_error`` column. Rows without a score pass through unchanged."""
    raw = rating_field(ds, RAW_SCORE)
    if np.isnan(raw).all():
        raw = rating_field(ds, "score", required=True)
    result = curate_scores(x, raw, **kwargs)
    return with_curated(ds, result), result


def with_curated(ds: Dataset, result: Curation) -> Dataset:
    """``ds`` with the curated ``rating.score``, ``rating.raw_score`` and ``score_error`` (Arrow, no per-row Python)."""
    from datasets.table import InMemoryTable

    table = ds.with_format("arrow")[: len(ds)]
    col = table.column(RATING).combine_chunks()
    names = [col.type.field(i).name for i in range(col.type.num_fields)]
    children = {n: col.field(n) for n in names}

    def ints(a: np.ndarray) -> pa.Array:
        return pa.array(np.nan_to_num(a, nan=0).astype(np.int32), pa.int32(), mask=np.isnan(a))

    children["score"] = ints(result.curated)
    children[RAW_SCORE] = ints(result.raw)
    mask = col.is_null()
    rating = pa.StructArray.from_arrays(list(children.values()), names=list(children), mask=mask)
    table = table.set_column(table.schema.get_field_index(RATING), RATING, rating)
    err = pa.array(result.score_error, pa.float64(), mask=np.isnan(result.score_error))
    if SCORE_ERROR in table.column_names:
        table = table.drop_columns([SCORE_ERROR])
    return Dataset(InMemoryTable(table.append_column(SCORE_ERROR, err)))
