"""``lmmixup rate --mode batch``: the rows to rate through a batch API (or a batch output file from
elsewhere), into the same checkpoint as the synchronous path."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmmixup_hf.data.io import write_jsonl
from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.judge.judges import RUBRIC_VERSION, JudgeItem, Rating
from lmmixup_hf.models.llm_client import request_key
from lmmixup_hf.pipeline.rate import Checkpoint, RateArgs
from lmmixup_hf.pipeline.rate_judge import _cache_dir, _load_prices
from lmmixup_hf.pipeline.workflow import StageRun

logger = logging.getLogger("lmmixup_hf.pipeline.rate")


def rate_batch(
    args: RateArgs,
    run: StageRun,
    items: Mapping[int, JudgeItem],
    ids: Sequence[str],
    todo: Sequence[int],
    ckpt: Checkpoint,
) -> dict[str, Any] | None:
    """Batch mode: rate ``todo`` through a batch API (or a batch output file from elsewhere) into the
    same checkpoint as the synchronous path. Returns the usage, or None with ``--batch_file_only``."""
    from lmmixup_hf.judge.batch import (
        BatchRunner,
        BatchState,
        Chunk,
        batch_requests,
        batch_usage,
        iter_jsonl,
        rating_of,
        read_results,
        write_inputs,
    )
    from lmmixup_hf.judge.judges import OpenAIJudge, build_judge_messages
    from lmmixup_hf.models.llm_client import ChatResult

    judge = OpenAIJudge(
        args.judge_model,
        json_mode=args.json_mode,
        logprobs=args.logprobs,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        cache_dir=_cache_dir(args.cache_dir),
    )
    cache, prices = judge.client.cache, _load_prices(args.prices)
    usage = batch_usage(args.judge_model, prices)
    row_of = {ids[i]: i for i in items}

    def record(custom_id: str, rating: Rating) -> None:
        i = row_of.get(custom_id)
        if i is None:
            logger.warning("rate: a batch reply for unknown row id %r; ignored", custom_id)
        elif not (ckpt.done.get(i) or {}).get("ok"):  # a late reply never replaces a score: nothing twice
            ckpt.add(i, custom_id, rating)

    def cache_key(messages: list[dict], attempt: int) -> str:
        """The synchronous judge's cache key for this request (attempts after an unusable reply run hotter)."""
        params = {**judge.params, "temperature": max(float(args.temperature), 0.7)} if attempt else judge.params
        return request_key(args.judge_model, messages, {**params, "cache_tag": f"{RUBRIC_VERSION}|{attempt}"})

    def misses() -> Iterator[tuple[str, list[dict], int]]:
        """(row id, messages, attempt) of the rows to send, built one at a time; a row whose reply is
        cached (from either mode) is recorded on the way and needs no request."""
        for i in todo:
            attempt = int(str((ckpt.done.get(i) or {}).get("error") or "").startswith("unparseable reply"))
            messages = build_judge_messages(items[i])
            if cache is not None:
                hit = cache.get(cache_key(messages, attempt))
                if hit is not None:
                    result = ChatResult(hit["text"], None, hit.get("usage", {}), hit.get("logprobs"), cached=True)
                    usage.add(result)
                    record(ids[i], rating_of(result, judge.name))
                    continue
            yield ids[i], messages, attempt

    lines = batch_requests(misses(), args.judge_model, judge.params)
    if args.batch_file_only:
        path = Path(args.out) / "batch_input.jsonl"
        n = write_jsonl(path, lines)
        logger.info(
            "rate: wrote %d requests to %s; run them elsewhere (e.g. `vllm run-batch -i %s -o results.jsonl "
            "--model %s`), then rerun this command with --batch_results results.jsonl",
            n,
            path,
            path,
            args.judge_model,
        )
        return None
    if args.batch_results:
        files = [Path(p.strip()) for p in args.batch_results.split(",") if p.strip()]
        for f in files:
            if not f.is_file():
                raise LmmixupError(f"--batch_results: {f}: no such file")
        results = read_results(files)
        for cid, messages, attempt in misses():
            result = results.get(cid) or ChatResult(None, f"no reply for this row in {args.batch_results}")
            usage.add(result)
            rating = rating_of(result, judge.name)
            if rating.ok and cache is not None:
                value = {"text": result.text, "usage": result.usage, "logprobs": result.logprobs}
                cache.put(cache_key(messages, attempt), value)
            record(cid, rating)
        if cache is not None:
            cache.flush()
        return {**usage.as_dict(), "mode": "batch"}

    state = BatchState(run.work_dir)
    queued = {line["custom_id"] for chunk in state.pending for _, line in iter_jsonl(state.folder / chunk.input)}
    new = (line for line in lines if line["custom_id"] not in queued)
    prefix = f"batch-{state.rounds:03d}"
    written = [(p, n) for p, n in write_inputs(new, state.folder, prefix) if n]
    if written:
        state.chunks += [Chunk(p.name, n) for p, n in written]
        state.rounds += 1
        state.save()
    runner = BatchRunner(
        state,
        model=args.judge_model,
        judge=judge.name,
        base_url=args.base_url,
        api_key=args.api_key,
        poll_interval=args.batch_poll_interval,
        max_retries=args.max_retries,
        timeout=args.timeout,
        cache=cache,
        usage=usage,
        show_progress=args.progress,
        temperature=args.temperature,
    )
    runner.run(record)
    return {**usage.as_dict(), "mode": "batch"}
