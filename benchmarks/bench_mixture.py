"""MIXTURE builder and parquet export on a synthetic mirror of a chosen size.

The mirror repeats the fixture rows (tests/fixtures/mixture) with fresh ids until each task type has
``--train`` train and ``--test`` test rows, and derives data_grpo/ with the reference split, so it
has the real layout and realistic row lengths.

python benchmarks/bench_mixture.py --train 6000 --test 1400
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import datasets

import lmmixup_hf  # noqa: F401  (registers load_dataset("mixture"))
from lmmixup_hf.data.schema import TASK_TYPES
from lmmixup_hf.integrations.mixture import GRPO_FILES, merge_instruction, sft_file, split_sft_grpo
from lmmixup_hf.integrations.mixture_export import MixtureExportArgs, export

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mixture"


def _grow(rows: list[dict], n: int, task: str, split: str) -> list[dict]:
    return [{**rows[i % len(rows)], "id": f"{task}-{split}-{i}"} for i in range(n)]


def make_mirror(root: Path, n_train: int, n_test: int) -> int:
    grpo: dict[str, list] = {"train": [], "test": []}
    for task in TASK_TYPES:
        for split, n in (("train", n_train), ("test", n_test)):
            rows = json.loads((FIXTURE / sft_file(task, split)).read_text(encoding="utf-8"))
            rows = _grow(rows, n, task, split)
            path = root / sft_file(task, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
            if split == "train":
                parts = split_sft_grpo(rows)
                for name, part in (("train", parts.grpo_train), ("test", parts.grpo_test)):
                    grpo[name] += [
                        {
                            "input": merge_instruction(r["instruction"], r["input"]),
                            "output": r["output"],
                            "task_type": f"{task}_mixup",
                        }
                        for r in part
                    ]
    for name, rows in grpo.items():
        path = root / GRPO_FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return 5 * (n_train + n_test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=6000, help="train rows per task type")
    p.add_argument("--test", type=int, default=1400, help="test rows per task type")
    p.add_argument("--quick", action="store_true", help="a smoke run: 200 train / 50 test rows per task")
    args = p.parse_args()
    if args.quick:
        args.train, args.test = 200, 50
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "mirror", str(Path(tmp) / "cache")
        n = make_mirror(root, args.train, args.test)
        size = sum(f.stat().st_size for f in root.rglob("*.json"))
        print(f"mirror: {n:,} sft-file rows, {size / 2**20:.1f} MiB of JSON")

        for name in ("all", "all-sft", "all-grpo"):
            t = time.perf_counter()
            dsd = datasets.load_dataset("mixture", name, data_dir=str(root), cache_dir=cache)
            dt = time.perf_counter() - t
            rows = sum(len(d) for d in dsd.values())
            print(f"prepare {name:9s} {rows:>8,} rows  {dt:6.1f} s  {rows / dt:>8,.0f} rows/s")
            t = time.perf_counter()
            dsd = datasets.load_dataset("mixture", name, data_dir=str(root), cache_dir=cache)
            print(f"reload  {name:9s} (cached)        {time.perf_counter() - t:6.2f} s")

        t = time.perf_counter()
        stream = datasets.load_dataset("mixture", "all-grpo", data_dir=str(root), streaming=True)
        rows = sum(1 for _ in stream["train"])
        dt = time.perf_counter() - t
        print(f"stream  all-grpo train {rows:>8,} rows  {dt:6.1f} s  {rows / dt:>8,.0f} rows/s")

        t = time.perf_counter()
        out = export(MixtureExportArgs(out=str(Path(tmp) / "export"), data_dir=str(root), cache_dir=cache))
        dt = time.perf_counter() - t
        size = sum(f.stat().st_size for f in out.rglob("*.parquet"))
        print(f"export  15 configs + card   {dt:6.1f} s  ({size / 2**20:.1f} MiB of parquet)")

        t = time.perf_counter()
        dsd = datasets.load_dataset(str(out), "all-grpo", cache_dir=str(Path(tmp) / "pq"))
        print(f"parquet load_dataset(dir, 'all-grpo') {time.perf_counter() - t:6.1f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
