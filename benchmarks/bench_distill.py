"""Distiller throughput per engine: generated tokens/s and clusters/s.

    OMP_NUM_THREADS=1 python benchmarks/bench_distill.py --clusters 4 --max-new-tokens 64

- transformers: SmolLM2-135M-Instruct (the offline alias) on the CPU, fp32, greedy, batch sizes 1 and 4;
- openai: the same prompts through ``OpenAIEngine`` against a loopback OpenAI-compatible server that
  answers after ``--latency`` seconds, so the number measures the client (concurrency, retries,
  parsing), not a model;
- vllm: measured only where vLLM and a GPU are present.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lmmixup_hf.distiller.engines import make_engine  # noqa: E402
from lmmixup_hf.distiller.prompts import build_messages, format_target, linearize_cluster  # noqa: E402

TOPICS = [
    "tulips",
    "the Riverton bridge",
    "the capital of France",
    "photosynthesis",
    "the moon landing",
    "binary search",
    "the French revolution",
    "volcanoes",
]


def conversations(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        members = [
            (f"what is {t}?", f"{t} is something i read about"),
            (f"tell me about {t}", f"not sure, {t} maybe"),
            (f"{t} facts", f"some facts about {t} #{i}"),
        ]
        out.append(build_messages(linearize_cluster(members), "qa"))
    return out


def measure(engine, convs, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    gens = engine.generate(convs, max_new_tokens=max_new_tokens)
    s = time.perf_counter() - t0
    toks = sum(g.completion_tokens for g in gens)
    return {
        "clusters": len(convs),
        "seconds": round(s, 2),
        "completion_tokens": toks,
        "tokens_per_s": round(toks / s, 1),
        "clusters_per_s": round(len(convs) / s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--openai-clusters", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 cluster, 8 tokens, 16 openai clusters")
    a = ap.parse_args()
    if a.quick:
        a.clusters, a.max_new_tokens, a.openai_clusters = 1, 8, 16
    results = {}
    convs = conversations(a.clusters)
    for bs in (1, 4):
        engine = make_engine("transformers", "smollm2-135m-offline", batch_size=bs)
        results[f"transformers smollm2-135m cpu batch={bs}"] = measure(engine, convs, a.max_new_tokens)
        print(json.dumps(results), flush=True)

    from openai_server import OpenAIStubServer

    reply = format_target("Q: " + "word " * 40 + "?\nA: " + "word " * 200, "merge " * 40)
    with OpenAIStubServer(lambda body: reply, latency=a.latency) as server:
        engine = make_engine(
            "openai",
            "stub-model",
            base_url=server.base_url,
            api_key="local",
            max_concurrency=a.concurrency,
            tokenizer="none",
            show_progress=False,
        )
        results[f"openai loopback latency={a.latency}s concurrency={a.concurrency}"] = measure(
            engine, conversations(a.openai_clusters), 1024
        )
    if importlib.util.find_spec("vllm") is not None:
        engine = make_engine("vllm", "smollm2-135m-offline")
        results["vllm smollm2-135m"] = measure(engine, convs, a.max_new_tokens)
    else:
        results["vllm"] = "not measured (vllm not installed / no GPU)"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
