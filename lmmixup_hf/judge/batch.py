"""Judging through a batch API: the same rubric prompts and reply parser as the synchronous judge,
sent as OpenAI batch-input JSONL at about half the price.

One request line per row, ``custom_id`` = the row id::

    {"custom_id": "r001", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ..., "messages": ...}}

The same file runs on a self-hosted judge (``vllm run-batch -i input.jsonl -o output.jsonl --model ...``),
and the output lines of either are read back by :func:`read_results`.

Against an endpoint, :class:`BatchRunner` splits the requests at the provider's limits, uploads each
file, creates one batch per file and polls them. Every step is checkpointed in ``batches.json``
under the stage's work folder before the next one starts, so a rerun after Ctrl-C or SIGKILL
re-attaches to the batches already created (a batch is found again by its input file id even when
the kill came between its creation and the checkpoint) and reads a finished batch's output once.
The API key only ever lives in the client: the files and the state hold ids and requests.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmmixup_hf.judge.judges import RUBRIC_VERSION, Rating, ReplyParseError, expected_score, make_rating, parse_reply
from lmmixup_hf.models.llm_client import ChatResult, ResponseCache, UsageMeter, batch_price_for, request_key

logger = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
# OpenAI's limits per batch input file: 50,000 requests and 200 MB
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1000 * 1000
TERMINAL = ("completed", "failed", "expired", "cancelled")
STATE = "batches.json"
POLL_FAILURES = 10  # polls in a row that may fail (after the client's own retries) before the run stops


# -- request and result lines ---------------------------------------------------------------------
def request_line(custom_id: str, model: str, messages: list[dict], params: Mapping[str, Any]) -> dict[str, Any]:
    """One batch-input line: the chat request the synchronous judge would send for this row."""
    body = {"model": model, "messages": messages, **{k: v for k, v in params.items() if k != "cache_tag"}}
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}


def cache_key(body: Mapping[str, Any], tag: str) -> str:
    """The response-cache key of a request body, equal to the synchronous client's for the same request,
    so replies from either mode are reused by the other."""
    params = {k: v for k, v in body.items() if k not in ("model", "messages")}
    return request_key(body["model"], body["messages"], {**params, "cache_tag": tag})


def _error_text(error: Any) -> str:
    if isinstance(error, Mapping):
        code, message = error.get("code"), error.get("message")
        return f"{code}: {message}" if code else str(message or error)
    return str(error)


def result_of(line: Mapping[str, Any]) -> ChatResult:
    """A batch output/error line as the synchronous client's :class:`ChatResult`: a reply text, or an
    error (never a made-up text). Works for OpenAI's and ``vllm run-batch``'s output lines."""
    if line.get("error"):
        return ChatResult(None, f"batch request failed: {_error_text(line['error'])}")
    response = line.get("response") or {}
    status, body = response.get("status_code"), response.get("body")
    if not isinstance(body, Mapping):
        return ChatResult(None, f"batch reply without a body (status {status})")
    usage = body.get("usage") or {}
    counts = {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }
    if status != 200:
        message = _error_text(body.get("error") or body)
        return ChatResult(None, f"batch request failed with status {status}: {message}", counts)
    choices = body.get("choices") or []
    message = (choices[0] or {}).get("message") if choices and isinstance(choices[0], Mapping) else None
    text = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(text, str):
        return ChatResult(None, "the server returned no choices" if not choices else "empty message", counts)
    logprobs = ((choices[0].get("logprobs") or {}).get("content")) if isinstance(choices[0], Mapping) else None
    return ChatResult(text, None, counts, logprobs or None)


def rating_of(result: ChatResult, judge: str) -> Rating:
    """The rating for one reply, through the synchronous judge's parser."""
    if not result.ok:
        return Rating(None, None, judge=judge, error=result.error)
    try:
        dims = parse_reply(result.text)
    except ReplyParseError as e:
        return Rating(None, None, reply=result.text, judge=judge, error=f"unparseable reply: {e}")
    return make_rating(dims, judge, result.text, expected_score(result.logprobs))


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each well-formed line; a malformed line is logged and skipped."""
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                logger.warning("%s:%d: not a JSON line (%s); skipped", path, n, e.msg)
                continue
            if isinstance(obj, dict):
                yield n, obj
            else:
                logger.warning("%s:%d: not a JSON object; skipped", path, n)


def read_results(paths: Iterable[Path]) -> dict[str, ChatResult]:
    """custom_id -> result from output/error files. A custom_id seen twice keeps its first line, so
    no row is counted twice."""
    out: dict[str, ChatResult] = {}
    for path in paths:
        for n, line in iter_jsonl(path):
            cid = line.get("custom_id")
            if not isinstance(cid, str):
                logger.warning("%s:%d: no custom_id; skipped", path, n)
            elif cid in out:
                logger.warning("%s:%d: custom_id %r seen before; the first reply is kept", path, n, cid)
            else:
                out[cid] = result_of(line)
    return out


def write_inputs(
    lines: Iterable[dict[str, Any]],
    folder: Path,
    prefix: str,
    *,
    max_requests: int | None = None,
    max_bytes: int | None = None,
) -> list[tuple[Path, int]]:
    """Write request lines into files of at most ``max_requests`` lines and ``max_bytes`` bytes
    (default: the provider's limits; ``<prefix>-00000.jsonl``, ...); returns (path, requests) per file."""
    max_requests = max_requests or MAX_REQUESTS
    max_bytes = max_bytes or MAX_BYTES
    files: list[tuple[Path, int]] = []
    path, f, n, size = folder / f"{prefix}-00000.jsonl", None, 0, 0
    try:
        for line in lines:
            data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
            if len(data) > max_bytes:
                raise ValueError(f"request {line.get('custom_id')!r} alone is larger than {max_bytes} bytes")
            if f is None or n >= max_requests or size + len(data) > max_bytes:
                if f is not None:
                    f.close()
                    files.append((path, n))
                path = folder / f"{prefix}-{len(files):05d}.jsonl"
                f, n, size = open(path, "wb"), 0, 0  # noqa: SIM115 - closed above or below
            f.write(data)
            n, size = n + 1, size + len(data)
    finally:
        if f is not None:
            f.close()
            files.append((path, n))
    return files


def batch_usage(model: str, prices: dict | None = None) -> UsageMeter:
    """A usage meter that prices tokens at the batch rate."""
    meter = UsageMeter(model, prices)
    meter.price = batch_price_for(model, prices)
    return meter


# -- batches against an endpoint -----------------------------------------------------------------
@dataclass
class Chunk:
    """One input file and what became of it on the provider's side."""

    input: str  # file name under the work folder
    n: int
    uploaded_at: float | None = None
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    output: str | None = None  # downloaded output file (name under the work folder)
    errors: str | None = None  # downloaded error file
    failure: str | None = None  # why the whole batch failed, when it did
    applied: bool = False  # its results are in the checkpoint


class BatchState:
    """``batches.json``: the chunks and their ids, rewritten atomically after every step."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / STATE
        raw = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        self.chunks = [Chunk(**c) for c in raw.get("chunks", [])]
        self.rounds = int(raw.get("rounds", 0))

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rounds": self.rounds, "chunks": [asdict(c) for c in self.chunks]}, indent=1))
        os.replace(tmp, self.path)

    @property
    def pending(self) -> list[Chunk]:
        return [c for c in self.chunks if not c.applied]

    def input_lines(self, chunk: Chunk) -> Iterator[dict]:
        for _, line in iter_jsonl(self.folder / chunk.input):
            yield line


def _transient(exc: Exception) -> bool:
    """Worth retrying: no answer, a rate limit or a server error (a 4xx answer is final)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError))


class BatchRunner:
    """Upload, create, poll and download batches; hand every row's result to ``on_result``."""

    def __init__(
        self,
        state: BatchState,
        *,
        model: str,
        judge: str,
        base_url: str | None = None,
        api_key: str | None = None,
        poll_interval: float = 30.0,
        max_retries: int = 6,
        timeout: float = 60.0,
        cache: ResponseCache | None = None,
        usage: UsageMeter | None = None,
        show_progress: bool = True,
        temperature: float = 0.0,
    ):
        from openai import OpenAI

        self.state = state
        self.judge = judge
        self.poll_interval = poll_interval
        self.max_retries = max_retries
        self.cache = cache
        self.show_progress = show_progress
        self.temperature = temperature  # requests sampled hotter were asked again after an unusable reply
        self.usage = usage or batch_usage(model)
        self.client = OpenAI(
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
            max_retries=max_retries,
            timeout=timeout,
        )

    def __repr__(self) -> str:  # never show the key
        return f"BatchRunner({self.state.path})"

    # -- one step each, checkpointed --------------------------------------------------------------
    def _upload(self, chunk: Chunk) -> None:
        with open(self.state.folder / chunk.input, "rb") as f:
            uploaded = self.client.files.create(file=(chunk.input, f), purpose="batch")
        chunk.file_id, chunk.uploaded_at = uploaded.id, time.time()
        self.state.save()

    def _find(self, file_id: str, since: float) -> Any | None:
        """The batch already created for ``file_id`` (newest first; stops at batches older than the upload)."""
        for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == file_id:
                return batch
            if batch.created_at < since - 3600:
                return None
        return None

    def _create(self, chunk: Chunk) -> None:
        """Create the chunk's batch exactly once: before each attempt, look for one made by an attempt
        (or a run) whose answer never arrived."""
        client = self.client.with_options(max_retries=0)
        for attempt in range(self.max_retries + 1):
            batch = self._find(chunk.file_id, chunk.uploaded_at or 0.0)
            if batch is None:
                try:
                    batch = client.batches.create(
                        input_file_id=chunk.file_id,
                        endpoint=ENDPOINT,
                        completion_window="24h",
                        metadata={"lmmixup_input": chunk.input},
                    )
                except Exception as e:  # noqa: BLE001 - a transient failure: look again, then retry
                    if attempt == self.max_retries or not _transient(e):
                        raise
                    logger.warning("batch create for %s failed (%s); retrying", chunk.input, type(e).__name__)
                    time.sleep(min(60.0, 2**attempt) * (0.5 + random.random() / 2))
                    continue
            else:
                logger.info("%s: re-attached to batch %s", chunk.input, batch.id)
            chunk.batch_id, chunk.status = batch.id, batch.status
            self.state.save()
            return

    def _download(self, file_id: str | None, name: str) -> str | None:
        if not file_id:
            return None
        tmp = self.state.folder / (name + ".part")
        with self.client.files.with_streaming_response.content(file_id) as response:
            response.stream_to_file(tmp)
        os.replace(tmp, self.state.folder / name)
        return name

    def _poll(self, chunk: Chunk) -> Any:
        batch = self.client.batches.retrieve(chunk.batch_id)
        if batch.status != chunk.status:
            logger.info("batch %s (%s): %s", batch.id, chunk.input, batch.status)
        chunk.status = batch.status
        if batch.status in TERMINAL:
            stem = chunk.input.removesuffix(".jsonl")
            chunk.output = self._download(batch.output_file_id, f"{stem}.output.jsonl")
            chunk.errors = self._download(batch.error_file_id, f"{stem}.errors.jsonl")
            if batch.status == "failed":
                errors = (batch.errors.data if batch.errors else None) or []
                chunk.failure = "; ".join(f"{e.code}: {e.message}" for e in errors) or "the batch failed"
            self.state.save()
        return batch

    def _apply(self, chunk: Chunk, on_result: Callable[[str, Rating], None]) -> None:
        """Hand each of the chunk's rows its result; a row with no line in either file fails."""
        files = [self.state.folder / name for name in (chunk.output, chunk.errors) if name]
        results = read_results(files)
        if chunk.failure:
            why = f"batch {chunk.batch_id} failed: {chunk.failure}"
        else:
            why = f"no reply in batch {chunk.batch_id} ({chunk.status})"
        for line in self.state.input_lines(chunk):
            cid, body = line["custom_id"], line["body"]
            result = results.get(cid) or ChatResult(None, why)
            self.usage.add(result)
            rating = rating_of(result, self.judge)
            if rating.ok and self.cache is not None:
                value = {"text": result.text, "usage": result.usage, "logprobs": result.logprobs}
                attempt = 0 if body.get("temperature") == self.temperature else 1
                self.cache.put(cache_key(body, f"{RUBRIC_VERSION}|{attempt}"), value)
            on_result(cid, rating)
        if self.cache is not None:
            self.cache.flush()
        chunk.applied = True
        self.state.save()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, on_result: Callable[[str, Rating], None]) -> None:
        """Drive every pending chunk to its end; safe to interrupt and call again."""
        from tqdm.auto import tqdm

        pending = self.state.pending
        total = sum(c.n for c in pending)
        bar = tqdm(total=total, desc="rate (batch)", unit="row", disable=not self.show_progress, dynamic_ncols=True)
        try:
            for chunk in pending:
                if chunk.file_id is None:
                    self._upload(chunk)
                if chunk.batch_id is None:
                    self._create(chunk)
            failures = 0
            while True:
                done = 0
                for chunk in pending:
                    if chunk.status not in TERMINAL:
                        try:
                            batch = self._poll(chunk)
                        except Exception as e:  # noqa: BLE001 - an outage during a 24 h wait is not fatal at once
                            failures += 1
                            if failures > POLL_FAILURES:
                                raise
                            logger.warning(
                                "batch %s: poll failed (%s); next try in %g s",
                                chunk.batch_id,
                                type(e).__name__,
                                self.poll_interval,
                            )
                            continue
                        failures = 0
                        counts = batch.request_counts
                        done += (counts.completed + counts.failed) if counts else 0
                    if chunk.status in TERMINAL:
                        if not chunk.applied:
                            self._apply(chunk, on_result)
                        done += chunk.n
                bar.n = min(done, total)
                bar.set_postfix(
                    batches=" ".join(f"{c.status}" for c in pending)[:60], cost=f"${self.usage.cost_usd:.4f}"
                )
                bar.refresh()
                if all(c.applied for c in pending):
                    return
                time.sleep(self.poll_interval)
        finally:
            bar.close()
            self.client.close()


def batch_requests(
    rows: Sequence[tuple[str, list[dict], int]],
    model: str,
    params: Mapping[str, Any],
    hot_temperature: float = 0.7,
) -> Iterator[dict[str, Any]]:
    """Request lines for (custom_id, messages, attempt) rows; a row asked again after an unusable
    reply (attempt > 0) is sampled hotter, as the synchronous judge does."""
    for cid, messages, attempt in rows:
        p = dict(params)
        if attempt:
            p["temperature"] = max(float(p.get("temperature") or 0.0), hot_temperature)
        yield request_line(cid, model, messages, p)
