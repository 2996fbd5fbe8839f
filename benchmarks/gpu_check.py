"""One prepared GPU check: the GPU paths against the CPU, in one short run.

Prints a markdown table: exact kNN (long-tail self-search, k = 15) and data-driven clustering at
N x d on the GPU and the CPU, the transformers engine's generation tokens/s (batched, bf16 on the
GPU) and the time of one GRPO step (TRL, the format reward). Sized for about 5-8 minutes on one
H100 with torch, transformers, trl, datasets and sentence-transformers installed (no vLLM).

    python benchmarks/gpu_check.py                 # 1M x 384 on cuda (and the CPU for comparison)
    python benchmarks/gpu_check.py --quick         # tiny sizes, runs anywhere (the test suite runs it on CPU)

The CPU exact kNN is timed on a sample of queries and extrapolated (all-vs-all at 1M rows takes
hours on a CPU); every other figure is measured. A section that fails prints its error and the
others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_clustering import adjusted_rand, planted_groups  # noqa: E402

ROWS: list[str] = []


def row(what: str, device: str, size: str, seconds: float | None, figure: str = "", note: str = "") -> None:
    secs = "–" if seconds is None else f"{seconds:.2f}"
    line = f"| {what} | {device} | {size} | {secs} | {figure} | {note} |"
    ROWS.append(line)
    print(line, flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_knn(x: np.ndarray, devices: list[str], cpu_sample: int) -> None:
    from lmmixup_hf.embed.neighbors import knn
    from lmmixup_hf.stages.longtail import self_knn_sims

    n = len(x)
    for device in devices:
        if device == "cpu" and cpu_sample < n:
            q = np.random.default_rng(0).choice(n, cpu_sample, replace=False)
            t = time.perf_counter()
            knn(x[q], x, k=16, device="cpu")
            secs = (time.perf_counter() - t) * n / cpu_sample / 2  # the self-search is symmetric
            row(
                "exact kNN (k=15, all vs all)",
                "cpu",
                f"{n:,} x {x.shape[1]}",
                secs,
                "",
                f"est. from {cpu_sample:,} queries",
            )
            continue
        self_knn_sims(x[: min(n, 4096)], 15, device=device)  # warm-up (kernels, allocator)
        sync(device)
        t = time.perf_counter()
        self_knn_sims(x, 15, device=device, block=8192 if device.startswith("cuda") else 2048)
        sync(device)
        row("exact kNN (k=15, all vs all)", device, f"{n:,} x {x.shape[1]}", time.perf_counter() - t, "", "measured")


def check_clustering(n: int, d: int, devices: list[str], cpu_max: int) -> None:
    from lmmixup_hf.stages.cluster import cohesion, data_cluster

    for device in devices:
        m = min(n, cpu_max) if device == "cpu" else n
        x, group = planted_groups(m, d)
        sync(device)
        t = time.perf_counter()
        labels = data_cluster(x, min_size=2, max_size=5, mean_cap=3, std_cap=1, device=device).labels
        sync(device)
        secs = time.perf_counter() - t
        sizes = np.bincount(labels[labels >= 0])
        coh = float(np.nanmean(cohesion(x, labels)[sizes >= 2])) if len(sizes) else float("nan")
        figure = f"cohesion {coh:.3f}, ARI {adjusted_rand(group, labels):.3f}"
        row("clustering, data sizes 2/5/3/1", device, f"{m:,} x {d}", secs, figure, "planted groups")


def check_generation(model: str, device: str, batch: int, new_tokens: int) -> None:
    from lmmixup_hf.distiller.engines import TransformersEngine

    engine = TransformersEngine(model, batch_size=batch, device=device)
    convs = [[{"role": "user", "content": f"Write a short paragraph about the number {i}."}] for i in range(batch)]
    engine.generate(convs[:1], max_new_tokens=4, stop=())  # warm-up
    sync(device)
    t = time.perf_counter()
    out = engine.generate(convs, max_new_tokens=new_tokens, stop=())
    sync(device)
    secs = time.perf_counter() - t
    tokens = sum(g.completion_tokens for g in out)
    row(
        f"transformers engine, batch {batch}",
        device,
        f"{model}, {engine.dtype}",
        secs,
        f"{tokens / secs:,.0f} tokens/s",
        f"{tokens} new tokens",
    )


def check_grpo(model: str, device: str, batch: int, generations: int, length: int, workdir: str) -> None:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from lmmixup_hf.models.registry import resolve_model
    from lmmixup_hf.rewards import format_reward

    prompt = [{"role": "user", "content": "Merge the related question-answer pairs below into one."}]
    cuda = device.startswith("cuda")
    trainer = GRPOTrainer(
        model=resolve_model(model),
        reward_funcs=[format_reward],
        train_dataset=Dataset.from_list([{"prompt": prompt, "task_type": "qa_mixup"}] * (4 * batch)),
        args=GRPOConfig(
            output_dir=workdir,
            use_cpu=not cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(),
            gradient_checkpointing=False,
            per_device_train_batch_size=batch,
            num_generations=generations,
            max_completion_length=length,
            max_steps=2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            seed=0,
        ),
    )
    times: list[float] = []

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(StepTimer())
    trainer.train()
    row(
        "GRPO step (TRL, format reward)",
        device,
        f"{model}, {batch} completions ({batch // generations} prompts x {generations}), {length} tokens",
        times[-1],
        f"first step {times[0]:.2f} s",
        "generation + loss + update",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on whatever device there is (seconds)")
    ap.add_argument("--device", default=None, help="GPU device (default: cuda when available, else cpu only)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--cpu-sample", type=int, default=2000, help="queries timed for the CPU kNN estimate")
    ap.add_argument("--cpu-cluster-max", type=int, default=1_000_000, help="largest N clustered on the CPU")
    ap.add_argument("--model", default="smollm2-135m-offline")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=[], choices=["knn", "cluster", "generate", "grpo"])
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tempfile

    import torch

    from lmmixup_hf.embed.neighbors import resolve_device

    gpu = resolve_device(args.device)
    devices = [gpu, "cpu"] if gpu != "cpu" else ["cpu"]
    if args.quick:
        args.n, args.dim, args.cpu_sample, args.cpu_cluster_max = 3000, 64, 500, 3000
        args.gen_batch, args.gen_tokens = 2, 8
    name = torch.cuda.get_device_name(0) if gpu.startswith("cuda") else "no GPU"
    print(f"# gpu_check: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores; quick={args.quick}\n")
    print("| check | device | size | seconds | figure | note |")
    print("|---|---|---|---|---|---|")
    failed = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sections = {
            "knn": lambda: check_knn(planted_groups(args.n, args.dim)[0], devices, args.cpu_sample),
            "cluster": lambda: check_clustering(args.n, args.dim, devices, args.cpu_cluster_max),
            "generate": lambda: check_generation(args.model, gpu, args.gen_batch, args.gen_tokens),
            "grpo": lambda: check_grpo(
                args.model, gpu, 4 if args.quick else 64, 2 if args.quick else 8, 8 if args.quick else 256, tmp
            ),
        }
        for key, run in sections.items():
            if key in args.skip:
                continue
            try:
                run()
            except Exception as e:  # one broken section must not hide the others' figures
                failed.append(key)
                traceback.print_exc()
                row(key, gpu, "", None, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; failed: {', '.join(failed) or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
