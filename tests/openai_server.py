"""A loopback OpenAI-compatible server for tests: real HTTP on 127.0.0.1, scripted replies, injected
faults and request counting.

It speaks the wire protocol the ``openai`` client expects (``GET /v1/models``,
``POST /v1/chat/completions``, and the Batch API: ``/v1/files`` upload and content, ``/v1/batches``
create, retrieve, list and cancel), so tests exercise the same code paths as a real endpoint.

A batch stays ``validating``/``in_progress`` for ``batch_polls`` retrieves, then answers every line
with the same responder as the chat endpoint: scripted errors go to the error file; items containing
``BATCH_TRUNCATED`` get a cut-off output line, ``BATCH_NOCHOICES`` a reply without choices and
``BATCH_ERRORLINE`` an error-file line with a top-level ``error``.

>>> def responder(body):            # body: the parsed request JSON
...     return "hello"              # or {"content": ..., "logprobs": [...], "usage": {...}}
...                                 # or {"status": 500, "message": "..."} for a scripted error
>>> with OpenAIStubServer(responder, faults=Faults(rate_429=0.1, rate_500=0.05)) as server:
...     client = OpenAI(base_url=server.base_url, api_key="x")

Faults are decided from a hash of (seed, messages, attempt number for those messages), so a run is
reproducible however the requests interleave. Use the ``openai_server`` fixture to get a factory
whose servers are stopped after the test.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

Responder = Callable[[dict], "str | dict[str, Any]"]


@dataclass
class Faults:
    """Per-request fault probabilities (mutually exclusive, checked in this order)."""

    rate_429: float = 0.0
    retry_after: str = "0.05"  # value of the Retry-After header sent with a 429 (seconds)
    rate_500: float = 0.0
    rate_malformed: float = 0.0  # a 200 whose body is truncated JSON
    rate_slow: float = 0.0  # sleep ``slow_s`` before an otherwise normal reply
    slow_s: float = 0.5
    seed: int = 0
    first_attempts: tuple[str, ...] = ()  # faults forced on each prompt's 1st, 2nd, ... attempt


def messages_key(messages: Any) -> str:
    """A stable key for a request's messages (what the server counts calls by)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def last_user_text(body: dict) -> str:
    msgs = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return str(msgs[-1].get("content", "")) if msgs else ""


def token_logprobs(tokens: list[str], top: dict[int, dict[str, float]] | None = None) -> list[dict]:
    """OpenAI-format ``logprobs.content`` for ``tokens``; ``top[i]`` gives the alternatives
    (token -> probability) at position ``i``; other positions get the token itself at p=1."""
    import math

    out = []
    for i, tok in enumerate(tokens):
        alts = (top or {}).get(i, {tok: 1.0})
        top_lp = [{"token": t, "logprob": math.log(max(p, 1e-12)), "bytes": list(t.encode())} for t, p in alts.items()]
        own = alts.get(tok, 1.0)
        out.append(
            {"token": tok, "logprob": math.log(max(own, 1e-12)), "bytes": list(tok.encode()), "top_logprobs": top_lp}
        )
    return out


# -- a scripted LLM judge (rubric replies in JSON, with logprobs) ----------------------------------
def json_tokens(dims: dict[str, int]) -> list[str]:
    """A JSON reply split into tokens the way an LLM might emit it (one token per score value)."""
    tokens = ["{"]
    for k, v in dims.items():
        tokens += ['"', k, '":', " ", str(v), ", " if k != "overall" else "}"]
    return tokens


def scripted_overall(text: str) -> int:
    """A deterministic 'judgement' per item, so tests can check that scores are the server's."""
    return 1 + sum(map(ord, text)) % 10


def judge_responder(body: dict) -> dict:
    """Answer an ``lmmixup_hf.judge.judges`` rubric prompt: JSON dims whose overall is
    ``scripted_overall(<header + item>)``, with logprobs putting 0.75 on it and 0.25 one below.
    Items containing ``UNPARSEABLE`` get a reply with no score."""
    item = last_user_text(body).split("### ", 2)[-1]
    if "UNPARSEABLE" in item:
        return {"content": "I would rather not say."}
    overall = scripted_overall(item)
    dims = {"rarity": 5, "complexity": 6, "informativeness": 7, "overall": overall}
    tokens = json_tokens(dims)
    lower = str(max(1, overall - 1))
    top = {len(tokens) - 2: {str(overall): 0.75, lower: 0.25}}
    return {"content": "".join(tokens), "logprobs": token_logprobs(tokens, top)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the listen backlog is fixed when the socket starts listening, inside the constructor: set on the
    # class, not afterwards. With the default of 5, a burst of new connections loses SYNs, and each
    # lost one costs the client a 1 s (then 3 s, 7 s, ...) retransmission wait
    request_queue_size = 1024


@dataclass
class OpenAIStubServer:
    responder: Responder = field(default=lambda body: "ok")
    latency: float = 0.0  # fixed delay before every reply (seconds)
    faults: Faults = field(default_factory=Faults)
    model: str = "stub-model"
    reject_params: tuple[str, ...] = ()  # answer 400 when a request uses one of these (e.g. response_format)
    batch_polls: int = 3  # retrieves a batch takes before it completes
    batch_retrieve_errors: int = 0  # answer this many batch retrieves with a 500 first
    batch_create_lost: int = 0  # create this many batches but answer 500, as if the reply were lost

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.reset_counts()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- counters -------------------------------------------------------------------------------
    def reset_counts(self) -> None:
        with self._lock:
            self.n_requests = 0  # POST /chat/completions received
            self.n_ok = 0  # answered 200 with a well-formed completion
            self.faults_sent: Counter[str] = Counter()
            self.slow_by_key: Counter[str] = Counter()  # slow replies per key (the client may have given up)
            self.calls_by_key: Counter[str] = Counter()  # attempts per messages key
            self.ok_by_key: Counter[str] = Counter()  # successful replies per messages key
            self.bodies: list[dict] = []
            self.authorization: set[str] = set()
            self.last_headers: dict[str, str] = {}  # of the last chat request
            self.max_in_flight = 0
            self._in_flight = 0
            self.files: dict[str, bytes] = {}
            self.batches: dict[str, dict] = {}
            self.n_batch_creates = 0
            self.n_uploads = 0
            self.downloads: Counter[str] = Counter()  # file content downloads per file id
            self.batch_lines: Counter[str] = Counter()  # batch requests answered per custom_id

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> OpenAIStubServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.authorization.add(self.headers.get("Authorization", ""))
                if "/files" in self.path or "/batches" in self.path:
                    server._batch_api(self, "GET", b"")
                elif self.path.rstrip("/").endswith("/models"):
                    self._send(
                        200,
                        {
                            "object": "list",
                            "data": [{"id": server.model, "object": "model", "created": 0, "owned_by": "stub"}],
                        },
                    )
                else:
                    self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if "/files" in self.path or "/batches" in self.path:
                    with server._lock:
                        server.authorization.add(self.headers.get("Authorization", ""))
                    server._batch_api(self, "POST", raw)
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}})
                    return
                server._handle(self, body)

            def _send(
                self, status: int, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
            ) -> None:
                data = raw if raw is not None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OpenAIStubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- one request ----------------------------------------------------------------------------
    def _fault(self, key: str, attempt: int) -> str | None:
        f = self.faults
        if attempt < len(f.first_attempts):
            return f.first_attempts[attempt]
        r = random.Random(f"{f.seed}|{key}|{attempt}").random()
        for name, rate in (
            ("429", f.rate_429),
            ("500", f.rate_500),
            ("malformed", f.rate_malformed),
            ("slow", f.rate_slow),
        ):
            if r < rate:
                return name
            r -= rate
        return None

    def _handle(self, h: Any, body: dict) -> None:
        key = messages_key(body.get("messages"))
        with self._lock:
            self.n_requests += 1
            attempt = self.calls_by_key[key]
            self.calls_by_key[key] += 1
            self.bodies.append(body)
            self.authorization.add(h.headers.get("Authorization", ""))
            self.last_headers = dict(h.headers)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
            rejected = [p for p in self.reject_params if p in body]
            if rejected:
                h._send(
                    400,
                    {
                        "error": {
                            "message": f"unsupported parameter: {rejected[0]}",
                            "type": "invalid_request_error",
                            "param": rejected[0],
                        }
                    },
                )
                return
            fault = self._fault(key, attempt)
            if fault:
                with self._lock:
                    self.faults_sent[fault] += 1
                    if fault == "slow":
                        self.slow_by_key[key] += 1
            if fault == "429":
                h._send(
                    429,
                    {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                    headers={"Retry-After": self.faults.retry_after},
                )
                return
            if fault == "500":
                h._send(500, {"error": {"message": "internal error", "type": "server_error"}})
                return
            if fault == "malformed":
                h._send(200, None, raw=b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind')
                return
            if fault == "slow":
                time.sleep(self.faults.slow_s)
            reply = self._completion(body)
            if isinstance(reply, tuple):
                h._send(*reply)
                return
            h._send(200, reply)
            with self._lock:
                self.n_ok += 1
                self.ok_by_key[key] += 1
        finally:
            with self._lock:
                self._in_flight -= 1

    # -- the Batch API ----------------------------------------------------------------------------
    def _batch_api(self, h: Any, method: str, raw: bytes) -> None:
        path = h.path.split("?", 1)[0].rstrip("/")
        parts = path.split("/")  # ['', 'v1', 'files' | 'batches', id?, action?]
        kind, rest = parts[2], parts[3:]
        with self._lock:
            if kind == "files" and method == "POST" and not rest:
                data, name = self._multipart_file(h.headers.get("Content-Type", ""), raw)
                fid = f"file-{len(self.files) + 1}"
                self.files[fid] = data
                self.n_uploads += 1
                h._send(200, self._file_obj(fid, name))
            elif kind == "files" and method == "GET" and len(rest) == 2 and rest[1] == "content":
                if rest[0] not in self.files:
                    h._send(404, {"error": {"message": "no such file", "type": "invalid_request_error"}})
                    return
                self.downloads[rest[0]] += 1
                h._send(200, None, raw=self.files[rest[0]])
            elif kind == "batches" and method == "POST" and not rest:
                body = json.loads(raw)
                if body.get("input_file_id") not in self.files:
                    h._send(400, {"error": {"message": "unknown input file", "type": "invalid_request_error"}})
                    return
                self.n_batch_creates += 1
                bid = f"batch_{len(self.batches) + 1}"
                self.batches[bid] = {
                    "id": bid,
                    "object": "batch",
                    "endpoint": body["endpoint"],
                    "input_file_id": body["input_file_id"],
                    "completion_window": body["completion_window"],
                    "status": "validating",
                    "created_at": int(time.time()),
                    "metadata": body.get("metadata"),
                    "request_counts": {"total": 0, "completed": 0, "failed": 0},
                    "_polls": 0,
                }
                if self.batch_create_lost > 0:
                    self.batch_create_lost -= 1
                    h._send(500, {"error": {"message": "lost reply", "type": "server_error"}})
                    return
                h._send(200, self._public(self.batches[bid]))
            elif kind == "batches" and method == "GET" and not rest:
                data = [self._public(b) for b in reversed(self.batches.values())]
                h._send(200, {"object": "list", "data": data, "has_more": False})
            elif kind == "batches" and rest and rest[0] in self.batches:
                batch = self.batches[rest[0]]
                if method == "POST" and rest[1:] == ["cancel"]:
                    if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                        batch["status"] = "cancelling"
                elif method == "GET" and not rest[1:]:
                    if self.batch_retrieve_errors > 0:
                        self.batch_retrieve_errors -= 1
                        h._send(500, {"error": {"message": "try again", "type": "server_error"}})
                        return
                    self._advance(batch)
                h._send(200, self._public(batch))
            else:
                h._send(404, {"error": {"message": f"not found: {method} {path}", "type": "invalid_request_error"}})

    @staticmethod
    def _multipart_file(content_type: str, raw: bytes) -> tuple[bytes, str]:
        from email.parser import BytesParser
        from email.policy import HTTP

        msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        for part in msg.iter_parts():
            if part.get_param("name", header="content-disposition") == "file":
                return part.get_payload(decode=True), part.get_filename() or "upload.jsonl"
        raise ValueError("no file in the upload")

    def _file_obj(self, fid: str, name: str) -> dict:
        return {
            "id": fid,
            "object": "file",
            "bytes": len(self.files[fid]),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": "batch",
            "status": "processed",
        }

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _advance(self, batch: dict) -> None:
        """One retrieve: validating -> in_progress (a few polls) -> completed; cancelling -> cancelled."""
        batch["_polls"] += 1
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]].splitlines() if x.strip()]
        if batch["status"] == "cancelling":
            self._run_lines(batch, lines[: len(lines) // 2])
            batch.update(status="cancelled", cancelled_at=int(time.time()))
        elif batch["status"] in ("validating", "in_progress"):
            batch["request_counts"]["total"] = len(lines)
            if batch["_polls"] >= self.batch_polls:
                self._run_lines(batch, lines)
                batch.update(status="completed", completed_at=int(time.time()))
            else:
                batch["status"] = "in_progress"
                batch["request_counts"]["completed"] = len(lines) * (batch["_polls"] - 1) // self.batch_polls

    def _run_lines(self, batch: dict, lines: list[dict]) -> None:
        out, err = [], []
        for k, line in enumerate(lines):
            cid, body = line["custom_id"], line["body"]
            self.batch_lines[cid] += 1
            self.bodies.append(body)
            text = last_user_text(body)
            rid = f"req_{batch['id']}_{k}"
            if "BATCH_TRUNCATED" in text:
                out.append(json.dumps({"id": rid, "custom_id": cid, "response": {"status_code": 200}})[:-12])
                continue
            if "BATCH_ERRORLINE" in text:
                error = {"code": "server_error", "message": "the batch worker crashed"}
                err.append(json.dumps({"id": rid, "custom_id": cid, "response": None, "error": error}))
                continue
            reply = self._completion(body)
            if isinstance(reply, tuple):
                status, payload = reply
                response = {"status_code": status, "request_id": rid, "body": payload}
                err.append(json.dumps({"id": rid, "custom_id": cid, "response": response, "error": None}))
                continue
            if "BATCH_NOCHOICES" in text:
                reply["choices"] = []
            response = {"status_code": 200, "request_id": rid, "body": reply}
            out.append(json.dumps({"id": rid, "custom_id": cid, "response": response, "error": None}))
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = f"file-{len(self.files) + 1}"
                self.files[fid] = ("\n".join(rows) + "\n").encode()
                batch[name] = fid
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}

    def _completion(self, body: dict) -> dict | tuple[int, dict]:
        reply = self.responder(body)
        reply = {"content": reply} if isinstance(reply, str) else dict(reply)
        if "status" in reply:  # the responder scripts an error reply for this request
            return reply["status"], {
                "error": {"message": reply.get("message", "scripted error"), "type": "server_error"}
            }
        content = reply["content"]
        prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        usage = reply.get("usage") or {
            "prompt_tokens": max(1, prompt_chars // 4),
            "completion_tokens": max(1, len(content) // 4),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": content},
        }
        if body.get("logprobs") and reply.get("logprobs") is not None:
            choice["logprobs"] = {"content": reply["logprobs"]}
        else:
            choice["logprobs"] = None
        return {
            "id": f"chatcmpl-{self.n_requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [choice],
            "usage": usage,
        }


def server_factory() -> Iterator[Callable[..., OpenAIStubServer]]:
    """A factory: ``server = openai_server(responder, latency=0.05, faults=Faults(...))`` starts one;
    every server it started is stopped after the test."""
    started: list[OpenAIStubServer] = []

    def make(responder: Responder | None = None, **kw: Any) -> OpenAIStubServer:
        server = OpenAIStubServer(responder or (lambda body: "ok"), **kw).start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


# ``from openai_server import openai_server`` in a test module makes the fixture available there
openai_server = pytest.fixture(server_factory, name="openai_server")


if __name__ == "__main__":  # a standalone judge stub, e.g. for benchmarks: prints its base URL, serves until killed
    import argparse

    parser = argparse.ArgumentParser(description="Loopback OpenAI-compatible judge stub.")
    parser.add_argument("--latency", type=float, default=0.0)
    cli_args = parser.parse_args()
    stub = OpenAIStubServer(judge_responder, latency=cli_args.latency).start()
    print(stub.base_url, flush=True)
    threading.Event().wait()
