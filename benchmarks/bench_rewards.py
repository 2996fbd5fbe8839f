"""Reward throughput: ours (one encode per batch, vectorised posterior) against a faithful
re-implementation of the reference's per-batch design (two embedding models, answers encoded twice,
sklearn brute-force kNN, a Python posterior loop per row), with identical values in reference mode.

python benchmarks/bench_rewards.py --library-items 400 --prompts 64 --generations 4 --repeats 3
python benchmarks/bench_rewards.py --quick
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time

import numpy as np

from lmmixup_hf.models.registry import resolve_model
from lmmixup_hf.rewards import MixupReward, RewardConfig
from lmmixup_hf.rewards.common import extract_answer
from lmmixup_hf.rewards.config import clear_caches, embedder_for
from lmmixup_hf.rewards.library import build_task_library, load_library, save_library
from lmmixup_hf.rewards.quality import quality_scores

TASKS = ("qa", "mcq", "tfq", "cs", "para")
WORDS = (
    "bridge river iron engineer city tower museum planet orbit star ocean forest volcano market bank "
    "election court theory energy cell protein language music painting history empire treaty"
).split()


# -- the reference design, re-implemented from the method notes (section 10) --------------------------
class ReferenceDesign:
    """Per batch: encode answers for quality, encode answers + references again for alignment (with a
    second model instance), sklearn cosine brute kNN, and a per-row Python posterior."""

    STRUCTURE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL | re.IGNORECASE)
    PATTERNS = {
        "qa_mixup": r"<answer>.*?Q:.*?A:.*?</answer>",
        "mcq_mixup": r"<answer>.*?Q:.*?A\).*?B\).*?C\).*?D\).*?Answer:.*?</answer>",
        "cs_mixup": r"<answer>.*?C:.*?S:.*?</answer>",
        "tfq_mixup": r"<answer>.*?Answer:.*?</answer>",
    }

    def __init__(self, libraries: dict, model_path: str, k: int = 16):
        from sentence_transformers import SentenceTransformer
        from sklearn.neighbors import NearestNeighbors

        self.scorer = SentenceTransformer(model_path, device="cpu")
        self.aligner = SentenceTransformer(model_path, device="cpu")  # the reference loads a second copy
        self.k = k
        self.libs = {}
        for task, lib in libraries.items():
            nn = NearestNeighbors(n_neighbors=min(k, len(lib.scores)), metric="cosine", algorithm="brute")
            nn.fit(lib.embeddings)
            self.libs[task] = (nn, lib.scores.tolist(), lib.class_values.tolist(), lib.T.tolist(), lib.p.tolist())

    @staticmethod
    def answer(resp: str) -> str:
        m = re.search(r"<answer>(.*?)</answer>", resp, re.DOTALL)
        return m.group(1).strip() if m else resp.strip()

    def quality(self, answers, tasks):
        return self.quality_from(
            lambda rows: self.scorer.encode([answers[i] for i in rows], batch_size=16, normalize_embeddings=True),
            tasks,
        )

    def quality_from(self, embed, tasks):
        """Group rows by library, embed each group (``embed(rows)``), kNN, then a posterior per row."""
        out = [0.5] * len(tasks)
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            key = (t or "").replace("_mixup", "") if (t or "").replace("_mixup", "") in self.libs else "qa"
            groups.setdefault(key, []).append(i)
        for key, rows in groups.items():
            nn, scores, values, T, p = self.libs[key]
            emb = embed(rows)
            idx = nn.kneighbors(emb, n_neighbors=min(self.k, len(scores)), return_distance=False)
            for r, nbrs in zip(rows, idx):
                h = [0] * len(values)
                for j in nbrs:
                    h[values.index(scores[j])] += 1
                logp = [
                    math.log(p[i] + 1e-12) + sum(h[c] * math.log(T[i][c] + 1e-12) for c in range(len(values)))
                    for i in range(len(values))
                ]
                m = max(logp)
                w = [math.exp(x - m) for x in logp]
                post = [x / sum(w) for x in w]
                _entropy = -sum(x * math.log(x + 1e-12) for x in post)  # computed and discarded, as in the reference
                e = sum(v * x for v, x in zip(values, post))
                out[r] = 1.0 if e >= 4 else (0.3 if e == 3 else 0.0)
        return out

    def alignment(self, answers, refs):
        emb = self.aligner.encode(answers + refs, batch_size=16, normalize_embeddings=True)
        n = len(answers)
        return [1.0 if float(np.dot(emb[i], emb[n + i])) >= 0.8 else 0.0 for i in range(n)]

    def fmt(self, resp, task):
        score = 0.5 if self.STRUCTURE.match(resp) else 0.0
        if task == "para_mixup":
            score += 0.5
        elif task in self.PATTERNS and re.search(self.PATTERNS[task], resp, re.DOTALL | re.IGNORECASE):
            score += 0.5
        return score

    def __call__(self, completions, task_type, output):
        answers = [self.answer(c) for c in completions]
        q = self.quality(answers, task_type)
        a = self.alignment(answers, list(output))
        f = [self.fmt(c, t) for c, t in zip(completions, task_type)]
        return [0.5 * qi + 0.4 * ai + 0.1 * fi for qi, ai, fi in zip(q, a, f)]


# -- synthetic data --------------------------------------------------------------------------------
def sentence(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words)).capitalize() + "."


def item(rng, task: str, good: bool) -> str:
    n = 12 if good else 3
    body = sentence(rng, n) if good else " ".join(rng.choice(WORDS, n))
    if task == "qa":
        return f"Q: {sentence(rng, 6 if good else 2)[:-1]}?\nA: {body}"
    if task == "mcq":
        opts = "\n".join(f"{L}) {sentence(rng, 3 if good else 1)}" for L in "ABCD")
        return f"Q: {body}\n{opts}\nAnswer: {rng.choice(list('ABCD'))}"
    if task == "tfq":
        return f"{body}\nAnswer: {rng.choice(['True', 'False'])}"
    if task == "cs":
        return f"C: {rng.choice(WORDS).capitalize()}\nS: {body}"
    return " ".join(sentence(rng, n) for _ in range(3 if good else 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--library-items", type=int, default=400, help="items per task library")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="minilm-offline")
    ap.add_argument("--batch-size", type=int, default=16, help="our encode batch size (the reference uses 16)")
    ap.add_argument("--quick", action="store_true", help="a small run (CI)")
    args = ap.parse_args()
    if args.quick:
        args.library_items, args.prompts, args.repeats = 60, 16, 1

    rng = np.random.default_rng(0)
    cfg0 = RewardConfig(embedding_model=args.model, mode="reference", k=16, batch_size=args.batch_size)
    embedder = embedder_for(cfg0)
    libs = {}
    for task in TASKS:
        good = rng.random(args.library_items) < 0.5
        texts = [item(rng, task, g) for g in good]
        scores = np.where(good, rng.choice([4, 5], len(good)), rng.choice([0, 2, 3], len(good)))
        libs[task] = build_task_library(task, embedder.encode(texts), scores, args.model, k_t=3)
    root = tempfile.mkdtemp(prefix="bench-library-")
    save_library(libs, root)

    completions, tasks, outputs = [], [], []
    for i in range(args.prompts):
        task = TASKS[i % len(TASKS)]
        ref = item(rng, task, True)
        for _ in range(args.generations):
            good = rng.random() < 0.5
            answer = ref if rng.random() < 0.25 else item(rng, task, good)
            text = f"<think>\nmerge\n</think>\n\n<answer>\n{answer}\n</answer>" if rng.random() < 0.8 else answer
            completions.append(text)
            tasks.append(f"{task}_mixup")
            outputs.append(ref)
    n = len(completions)

    ours = MixupReward(cfg0.with_(library=root))
    reference = ReferenceDesign(load_library(root, args.model), resolve_model(args.model))
    ours(None, completions[:8], task_type=tasks[:8], output=outputs[:8])  # load models once, untimed
    reference(completions[:8], tasks[:8], outputs[:8])

    def timed(fn):
        best, values = float("inf"), None
        for _ in range(args.repeats):
            clear_caches()  # no memo carried between repeats
            t = time.perf_counter()
            values = fn()
            best = min(best, time.perf_counter() - t)
        return best, values

    before = embedder.n_encoded
    t_ours, v_ours = timed(lambda: ours(None, completions, task_type=tasks, output=outputs))
    encoded = (embedder.n_encoded - before) // args.repeats
    t_ref, v_ref = timed(lambda: reference(completions, tasks, outputs))
    identical = v_ours == v_ref
    print(
        f"batch: {n} completions ({args.prompts} prompts x {args.generations}), library {args.library_items}/task, model {args.model}"
    )
    print(f"texts encoded per batch: ours {encoded}, reference {3 * n}")
    print(f"ours:      {t_ours:.3f} s  {n / t_ours:8.1f} completions/s")
    print(f"reference: {t_ref:.3f} s  {n / t_ref:8.1f} completions/s")
    print(f"speed-up: {t_ref / t_ours:.2f}x   identical values: {identical}   mean reward {np.mean(v_ours):.4f}")
    print(f"distinct reward values: {sorted(set(round(v, 4) for v in v_ours))}")
    # the scoring alone, embeddings given: sklearn kNN + a posterior loop per row vs. matmul kNN + one matrix posterior
    emb = embedder.encode([extract_answer(c, "reference") for c in completions])
    libs_loaded = load_library(root, args.model)
    t_q_ours, q_ours = timed(lambda: quality_scores(emb, tasks, libs_loaded, "reference", 16))
    t_q_ref, q_ref = timed(lambda: reference.quality_from(lambda rows: emb[rows], tasks))
    print(
        f"quality scoring only ({n} answers, embeddings given): ours {t_q_ours * 1e3:.1f} ms, reference "
        f"{t_q_ref * 1e3:.1f} ms, speed-up {t_q_ref / t_q_ours:.1f}x, identical: {q_ours == q_ref}"
    )
    if not identical:
        diff = sum(a != b for a, b in zip(v_ours, v_ref))
        raise SystemExit(f"values differ on {diff} of {n} completions")


if __name__ == "__main__":
    main()
