"""``lmmixup rate``: score every row with the LLM judge, resumably, and split by quality.

Each finished row (scored or failed) is appended to a checkpoint under the stage's work folder the
moment its reply arrives, so Ctrl-C or SIGKILL loses at most the rows in flight, and a rerun asks
the judge only about the rest. Failed rows are recorded with their error (``failed.jsonl``), never
scored, and retried on the next run; the stage counts as complete only when none is left. The
judging itself is :mod:`lmmixup_hf.stages.rate`; this module adds the files around it. On an
executor out of this process (Ray) the workers read, rate and write their own blocks of rows, with
a completion record per block, and the driver never holds the rows (:mod:`.rate_blocks`).

Outputs under ``--out``: ``data/`` (the rated rows with a ``rating`` struct, written once),
``summary.{json,md,png}`` (score histograms overall and per source, with the high-quality share),
``failed.jsonl``, ``rejected.jsonl`` and ``manifest.json`` (with token usage and cost). The rows are
divided into high and low quality by ``split``, which owns that rule's output."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset

from lmmixup_hf.data.io import read_pool, write_jsonl
from lmmixup_hf.data.quality import high_quality_mask
from lmmixup_hf.data.schema import (
    HIGH_QUALITY_THRESHOLD,
    ID,
    RATING,
    SOURCE,
    LmmixupError,
)
from lmmixup_hf.execution.base import Executor, LocalExecutor
from lmmixup_hf.judge.judges import KINDS, RUBRIC_VERSION, JudgeItem, Rating, make_judge
from lmmixup_hf.options import OptionError, Options
from lmmixup_hf.pipeline.rate_judge import _load_prices, judge_factory
from lmmixup_hf.pipeline.rate_summary import summarize, write_summary
from lmmixup_hf.pipeline.registry import stage
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.stages.rate import judge_items, judge_on, with_ratings

logger = logging.getLogger(__name__)


CHECKPOINT = "ratings.jsonl"

FAILED = "failed.jsonl"

# a rubric reply, {"rarity": 7, "complexity": 6, "informativeness": 7, "overall": 8}, is about 30 tokens
REPLY_TOKENS = 32


Rubric = Literal[(*KINDS, "auto", "reference")]  # type: ignore[valid-type]

# Operational options ("fingerprint": False) change how fast or where the stage runs, or how it
# reaches the judge, not what it produces: they never invalidate a finished stage.


@dataclass
class RateArgs(Options):
    input: str = field(metadata={"help": "Pool (.jsonl/.json/.parquet, a stage folder or a Hub id)."})
    out: str = field(metadata={"help": "Output folder."})
    judge_model: str = field(
        default="gpt-4o-mini", metadata={"help": "Judge model id (or a local model for --engine local)."}
    )
    engine: Literal["openai", "local"] = field(
        default="openai", metadata={"help": "openai: any OpenAI-compatible endpoint; local: transformers."}
    )
    base_url: str | None = field(
        default=None, metadata={"help": "Endpoint URL (default: $OPENAI_BASE_URL, else OpenAI).", "fingerprint": False}
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "API key (default: $OPENAI_API_KEY, which is preferred: flags show up in process lists). Never written.",
            "fingerprint": False,
        },
    )
    threshold: int = field(
        default=HIGH_QUALITY_THRESHOLD, metadata={"help": "High quality means score (0-5) >= this.", "range": "[0, 5]"}
    )
    rubric: Rubric = field(
        default="general",
        metadata={
            "help": "general (instruction-response), a task type (qa/mcq/tfq/cs/para), auto (each row's task_type), "
            "or reference (the paper's rating prompt and reply parsing; each row's task_type, else qa)."
        },
    )
    fields: str = field(
        default="prompt,completion",
        metadata={
            "help": "Comma-separated columns the judge sees, e.g. 'completion' or 'output' to rate distilled outputs."
        },
    )
    reference_field: str | None = field(
        default=None, metadata={"help": "Column with a reference answer (reference-aware mode)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Rate only the first N rows.", "range": "[1, inf)"})
    max_concurrency: int = field(
        default=64, metadata={"help": "Requests in flight.", "range": "[1, inf)", "fingerprint": False}
    )
    rpm: float | None = field(
        default=None,
        metadata={"help": "Client-side limit, requests per minute.", "range": "(0, inf)", "fingerprint": False},
    )
    tpm: float | None = field(
        default=None,
        metadata={
            "help": "Client-side limit, tokens per minute (estimated).",
            "range": "(0, inf)",
            "fingerprint": False,
        },
    )
    json_mode: bool = field(
        default=True, metadata={"help": "Ask for a JSON object (dropped if the server rejects it)."}
    )
    logprobs: bool = field(default=True, metadata={"help": "Ask for logprobs to record the expected score."})
    temperature: float = field(default=0.0, metadata={"range": "[0, inf)"})
    max_tokens: int = field(default=128, metadata={"range": "[1, inf)"})
    max_retries: int = field(
        default=6,
        metadata={"help": "Retries on 429/5xx/timeouts/bad replies.", "range": "[0, inf)", "fingerprint": False},
    )
    timeout: float = field(
        default=60.0, metadata={"help": "Seconds per request.", "range": "(0, inf)", "fingerprint": False}
    )
    retry_base_delay: float = field(
        default=1.0,
        metadata={
            "help": "First backoff in seconds (doubles, with jitter).",
            "range": "[0, inf)",
            "fingerprint": False,
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Response cache folder (default: $LMMIXUP_CACHE/llm); 'none' disables it.",
            "fingerprint": False,
        },
    )
    prices: str | None = field(
        default=None,
        metadata={
            "help": "JSON file {model: [usd_in_per_1M, usd_out_per_1M]} extending the built-in price table.",
            "fingerprint": False,
        },
    )
    batch_size: int = field(
        default=8, metadata={"help": "Batch size of the local judge.", "range": "[1, inf)", "fingerprint": False}
    )
    progress: bool = field(default=True, metadata={"help": "Show the progress bar.", "fingerprint": False})
    mode: Literal["sync", "batch"] = field(
        default="sync",
        metadata={
            "help": "sync: one request per row, answered at once; batch: the provider's Batch API (about half "
            "the price, answered within 24 h; rerun the command to re-attach after an interruption; "
            "--engine openai only).",
            "fingerprint": False,
        },
    )
    batch_file_only: bool = field(
        default=False,
        metadata={
            "help": "Batch mode: only write <out>/batch_input.jsonl (e.g. for `vllm run-batch`) and stop.",
            "fingerprint": False,
        },
    )
    batch_results: str | None = field(
        default=None,
        metadata={
            "help": "Batch mode: read replies from these batch output files (comma-separated) instead of an API.",
            "fingerprint": False,
        },
    )
    batch_poll_interval: float = field(
        default=30.0,
        metadata={"help": "Batch mode: seconds between status polls.", "range": "(0, inf)", "fingerprint": False},
    )
    estimate: bool = field(
        default=False,
        metadata={
            "help": "Only print the rows to rate, estimated tokens and cost (sync and batch), then stop.",
            "fingerprint": False,
        },
    )
    scores_from: str | None = field(
        default=None,
        metadata={
            "help": "Skip the judge and take the scores the input rows carry: `rating` (a rating struct: its score, "
            "else its raw compressed) or the name of a numeric column (see --score_scale). Rows without a usable "
            "score are quarantined.",
            "fingerprint": "non-default",  # added after rated runs existed: they stay up to date
        },
    )
    score_scale: Literal["raw", "score"] = field(
        default="raw",
        metadata={
            "help": "Scale of the --scores_from column: raw (the judge's 1-10, compressed by clip(raw, 4, 9) - 4) "
            "or score (already 0-5).",
            "fingerprint": "non-default",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not [f for f in self.fields.split(",") if f.strip()]:
            raise OptionError("fields", "name at least one column", self.fields)
        if self.rubric == "reference" and self.reference_field:
            raise OptionError(
                "reference_field",
                "not with rubric reference, which shows the item only (as the paper's script)",
                self.reference_field,
            )
        for key in ("mode", "batch_file_only", "batch_results"):  # batch APIs are OpenAI-compatible only
            value = getattr(self, key)
            if (value == "batch" if key == "mode" else value) and self.engine != "openai":
                raise OptionError(key, f"needs engine openai (engine is {self.engine!r})", value)


class Checkpoint:
    """Append-only JSON lines of finished rows, flushed one by one; the last line per index wins."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[int, dict[str, Any]] = {}
        if path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    self.done[int(rec["i"])] = rec
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def add(self, i: int, row_id: str, rating: Rating) -> None:
        rec = {
            "i": i,
            "id": row_id,
            "ok": rating.ok,
            "error": rating.error,
            "rating": rating.as_struct() if rating.ok else None,
        }
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done[i] = rec

    def close(self) -> None:
        self._f.close()


# -- the command: files, checkpoints, batches, summaries around the core ---------------------------
def rate(args: RateArgs, executor: Executor | None = None) -> Dataset | None:
    """Run the stage (or return its output when it is up to date). ``executor`` runs the judging
    (default: here; see :mod:`lmmixup_hf.pipeline.executors`)."""
    fields = [f.strip() for f in args.fields.split(",") if f.strip()]
    if args.engine == "openai" and not args.scores_from and not (args.base_url or os.environ.get("OPENAI_BASE_URL")):
        if not (args.api_key or os.environ.get("OPENAI_API_KEY")):  # fail now, not once per row
            raise LmmixupError("the OpenAI API needs a key: set OPENAI_API_KEY (or --base_url for a local server)")
    version = "reference" if args.rubric == "reference" else RUBRIC_VERSION
    run = StageRun("rate", args.out, inputs=[args.input], params=args, tags={"rubric_version": version})
    if run.is_complete():
        logger.info("rate: up to date, skipping (%s)", args.out)
        return run.load()
    batch = args.mode == "batch" or args.batch_file_only or args.batch_results
    if executor is not None and not executor.in_process and not (args.scores_from or batch or args.estimate):
        # on a cluster the workers read and write the rows themselves; the driver never holds them
        from lmmixup_hf.pipeline.rate_blocks import rate_on_blocks

        rate_on_blocks(run, args, executor, judge_factory(args, make_judge), fields, progress=args.progress)
        return run.load()

    ds = read_pool(args.input, quarantine=run.quarantine)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    missing = [f for f in [*fields, args.reference_field] if f and f not in ds.column_names]
    if missing:
        raise LmmixupError(
            f"{args.input}: no column(s) {', '.join(missing)}; columns are {', '.join(ds.column_names)}"
        )
    if args.scores_from:
        return _carried(run, args, ds)

    # the items; a row without the text to rate is rejected with its reason, not dropped
    items, unratable = judge_items(ds, fields, args.rubric, args.reference_field)
    ids = ds[ID]
    for i, reason in unratable:
        run.quarantine.add(str(args.input), i + 1, fields[0], f"cannot rate: {reason}", {ID: ids[i]})

    ckpt = Checkpoint(run.work_dir / CHECKPOINT)
    todo = [i for i in items if not (ckpt.done.get(i) or {}).get("ok")]
    logger.info(
        "rate: %d rows, %d already rated, %d to rate (%s)",
        len(items),
        len(items) - len(todo),
        len(todo),
        args.judge_model,
    )
    estimate = estimate_cost(args, [items[i] for i in todo])
    logger.info("rate: %s", estimate["line"])
    if args.estimate:
        ckpt.close()
        print(estimate["line"], flush=True)
        return None
    if batch:
        try:
            from lmmixup_hf.pipeline.rate_batch import rate_batch

            batch_usage = rate_batch(args, run, items, ids, todo, ckpt)
        finally:
            ckpt.close()
        if batch_usage is None:  # --batch_file_only: the requests are written, nothing is rated yet
            return None
        return _finish(run, args, ds, items, ckpt.done, {**batch_usage, "estimate": estimate["numbers"]})
    make = judge_factory(args, make_judge)
    from tqdm.auto import tqdm

    executor = executor or LocalExecutor()
    part = stage(executor.stage or "rate").parts[0]  # rate's, or rerate's when the pipeline runs it
    usage: dict[str, Any] = {"executor": executor.name, "mode": "sync"}
    try:
        with tqdm(total=len(todo), desc=f"rate ({executor.name})", unit="row", disable=not args.progress) as bar:
            for i, r in judge_on(executor, make, [items[i] for i in todo], todo, part, usage):
                ckpt.add(i, ids[i], r)
                bar.update(1)
    finally:
        ckpt.close()
    return _finish(run, args, ds, items, ckpt.done, {**usage, "estimate": estimate["numbers"]})


def _carried(run: StageRun, args: RateArgs, ds: Dataset) -> Dataset:
    """Ratings the rows already carry (``--scores_from``), through the same outputs as the judge's:
    rows without a usable score are quarantined with the reason, never scored 0."""
    from lmmixup_hf.stages.rate import carried_scores

    try:
        raw, score, bad = carried_scores(ds, args.scores_from, args.score_scale)
    except LmmixupError as e:
        raise LmmixupError(f"{args.input}: {e}") from None
    ids = ds[ID]
    for i, reason in bad:
        run.quarantine.add(str(args.input), i + 1, args.scores_from, reason, {ID: ids[i]})
    judge = f"carried:{args.scores_from}"
    ok = np.flatnonzero(~np.isnan(score))
    done = {
        int(i): {
            "ok": True,
            "rating": {"raw": None if np.isnan(r) else int(round(r)), "score": int(s), "judge": judge},
        }
        for i, r, s in zip(ok, raw[ok], score[ok])
    }
    logger.info("rate: %d rows carry a score in %r, %d do not (quarantined)", len(done), args.scores_from, len(bad))
    usage = {"mode": "carried", "column": args.scores_from}  # the manifest names where the scores came from
    return _finish(run, args, ds, dict.fromkeys(done), done, usage, engine="carried", judge_model=judge)


def estimate_cost(args: RateArgs, todo: Sequence[JudgeItem]) -> dict[str, Any]:
    """Rows, estimated tokens (prompt characters / 4, ``REPLY_TOKENS`` per reply) and the cost in
    synchronous and batch mode from the price table, before anything is sent."""
    from lmmixup_hf.judge.judges import build_judge_messages
    from lmmixup_hf.models.llm_client import batch_price_for, price_for

    # the rubric around an item is the same for every row of a kind: measure it once per kind
    frame: dict[tuple[str, bool], int] = {}
    chars = 0
    for item in todo:
        key = (item.kind, bool(item.reference))
        if key not in frame:
            kind = item.kind if item.kind in KINDS else "general"  # an unknown kind fails later, with its row
            empty = JudgeItem("", kind, "-" if item.reference else None)
            frame[key] = sum(len(m["content"]) for m in build_judge_messages(empty)) - (1 if item.reference else 0)
        chars += frame[key] + len(item.text.strip()) + len((item.reference or "").strip())
    prompt = chars // 4
    output = len(todo) * min(REPLY_TOKENS, args.max_tokens)
    prices = _load_prices(args.prices)
    costs = {}
    for mode, price in (
        ("sync", price_for(args.judge_model, prices)),
        ("batch", batch_price_for(args.judge_model, prices)),
    ):
        costs[mode] = (
            round((prompt * price[0] + output * price[1]) / 1e6, 4) if price and args.engine == "openai" else None
        )
    money = (
        f"${costs['sync']:,.4f} synchronous, ${costs['batch']:,.4f} batch"
        if costs["sync"] is not None
        else "cost unknown (no price for this model; see --prices)"
    )
    if args.engine != "openai":
        money = "no API cost (local judge)"
    line = (
        f"estimate: {len(todo):,} rows to rate, ~{prompt:,} prompt + ~{output:,} output tokens; "
        f"{args.judge_model}: {money}"
    )
    numbers = {"rows": len(todo), "prompt_tokens": prompt, "completion_tokens": output}
    numbers.update({f"{mode}_usd": cost for mode, cost in costs.items()})
    return {"line": line, "numbers": numbers}


def _finish(
    run: StageRun,
    args: RateArgs,
    ds: Dataset,
    items: Mapping[int, JudgeItem],
    done: Mapping[int, Mapping[str, Any]],
    usage: Mapping[str, Any],
    engine: str | None = None,
    judge_model: str | None = None,
) -> Dataset:
    """Write the rated rows, failed.jsonl, the summary and the manifest (``engine``/``judge_model``:
    what the manifest names as the judge, when it is not the options' own)."""
    out, failed = with_ratings(ds, items, done)
    rated = sorted(set(items) - set(failed))
    structs = out[RATING] if len(out) else []

    write_jsonl(
        Path(args.out) / FAILED,
        (
            {
                ID: ds[i][ID],
                SOURCE: ds[i][SOURCE],
                "line": i + 1,
                "error": (done.get(i) or {}).get("error") or "not rated",
            }
            for i in failed
        ),
    )
    scores = np.asarray([s["score"] for s in structs], dtype=np.int64)
    sources = np.asarray(out[SOURCE] if len(out) else [], dtype=object)
    high_mask = high_quality_mask(scores, args.threshold)  # the one definition of high quality (for the summary)
    summary = summarize(scores, sources, high_mask, failed_sources=[ds[i][SOURCE] for i in failed])
    write_summary(Path(args.out), summary, args.threshold)
    counts = {
        "rows": len(items),
        "rated": len(rated),
        "failed": len(failed),
        "high": int(high_mask.sum()),
        "low": int((~high_mask).sum()),
    }
    run.finish(
        out,
        counts=counts,
        extra={
            "usage": dict(usage),
            "judge": {
                "engine": engine or args.engine,
                "model": judge_model or args.judge_model,
                "rubric": args.rubric,
                "rubric_version": RUBRIC_VERSION,
            },
            "summary": summary["all"],
        },
        incomplete=f"{len(failed)} of {len(items)} rows failed (see {FAILED})" if failed else None,
    )
    logger.info(
        "rate: %d rated (%d high, %d low), %d failed; usage %s",
        len(rated),
        counts["high"],
        counts["low"],
        len(failed),
        usage,
    )
    return out
