"""``lmmixup build-quality-library``: the Bayes quality library from rated rows, one per task type.

Accepts the rated pools written by ``lmmixup rate`` (``rating.score``, 0..5), or the user's own
rated files (JSON / JSONL / parquet, or a stage folder) with a plain or dotted score key such as the
reference's ``rating_detail.Overall_compressed``. Rows without text or score are quarantined to
``rejected.jsonl`` with their file, line and field, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmmixup_hf.data.schema import TASK_TYPES, LmmixupError, RowError, normalize_task_type
from lmmixup_hf.embed.embeddings import get_embedder
from lmmixup_hf.models.registry import DEFAULT_EMBEDDING_MODEL
from lmmixup_hf.options import Options, check_task_type
from lmmixup_hf.pipeline.workflow import StageRun
from lmmixup_hf.rewards.library import DEFAULT_K_T, build_task_library, library_text, save_library

logger = logging.getLogger(__name__)

DEFAULT_SCORE_KEYS = ("rating.score", "score", "rating_detail.Overall_compressed")

# Text fields per task, tried in order (reference library field names first, then our columns).
_FIELDS = {
    "mcq": ("fine_mcq", "text", "output", "completion"),
    "tfq": ("tfq_part", "text", "output", "completion"),
    "para": ("paragraph", "text", "output", "completion"),
}


@dataclass
class LibraryArgs(Options):
    out: str = field(metadata={"help": "Output folder: <out>/<task>/{library.safetensors,meta.json} + manifest.json."})
    input: list[str] = field(
        default_factory=list,
        metadata={"help": "Rated files/folders; the task comes from each row's `task_type` (default --task_type)."},
    )
    qa: str | None = field(default=None, metadata={"help": "Rated qa rows (file or folder)."})
    mcq: str | None = field(default=None, metadata={"help": "Rated mcq rows."})
    tfq: str | None = field(default=None, metadata={"help": "Rated tfq rows."})
    cs: str | None = field(default=None, metadata={"help": "Rated cs rows."})
    para: str | None = field(default=None, metadata={"help": "Rated para rows."})
    task_type: str = field(default="qa", metadata={"help": "Task of --input rows that have no `task_type`."})
    score_key: str | None = field(
        default=None,
        metadata={
            "help": "Dotted key of the 0..5 score (default: rating.score, score, rating_detail.Overall_compressed)."
        },
    )
    text_key: str | None = field(
        default=None, metadata={"help": "Field holding the item text (default: per-task builders)."}
    )
    embedding_model: str = field(
        default=DEFAULT_EMBEDDING_MODEL,
        metadata={"help": "Sentence-transformers model; recorded and checked on load."},
    )
    k_t: int = field(
        default=DEFAULT_K_T,
        metadata={
            "help": "Neighbours per item when estimating T (reference: 3; examples used 2).",
            "range": "[1, inf)",
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "Embedding batch size.", "range": "[1, inf)", "fingerprint": False}
    )
    device: str | None = field(
        default=None, metadata={"help": "Embedding device (default: cuda if available).", "fingerprint": False}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_task_type(self)


def dotted(row: Mapping[str, Any], key: str) -> Any:
    """``row["a"]["b"]`` for ``a.b``; also looks inside the pool's ``extra`` JSON column."""
    value: Any = row
    for part in key.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            value = None
            break
    if value is None and isinstance(row.get("extra"), str):
        try:
            return dotted(json.loads(row["extra"]), key)
        except (ValueError, TypeError):
            return None
    return value


def row_score(row: Mapping[str, Any], score_key: str | None) -> int:
    keys = (score_key,) if score_key else DEFAULT_SCORE_KEYS
    for key in keys:
        value = dotted(row, key)
        if value is None:
            continue
        if isinstance(value, bool):
            raise RowError(key, "expected a number, got a boolean")
        try:
            return int(round(float(value)))
        except (TypeError, ValueError):
            raise RowError(key, f"not a number: {value!r}") from None
    raise RowError(keys[0], "missing score (looked for " + ", ".join(keys) + ")")


def _text(row: Mapping[str, Any], key: str) -> str | None:
    value = dotted(row, key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def row_text(row: Mapping[str, Any], task: str, text_key: str | None) -> str:
    """The reference's per-task text builders, extended to our pool columns."""
    if text_key:
        text = _text(row, text_key)
        if text is None:
            raise RowError(text_key, "missing or empty text")
        return library_text(task, text)
    if task == "qa":
        q = _text(row, "question") or _text(row, "prompt")
        a = _text(row, "answer") or _text(row, "completion")
        if q and a:
            return f"Q: {q}\nA: {a}"
        text = _text(row, "text") or _text(row, "output")
        if text:
            return text
        raise RowError("question", "missing question/answer (or prompt/completion)")
    if task == "cs":
        c, s = _text(row, "category"), _text(row, "summarised_text")
        if c and s:
            return f"C: {c}\nS: {s}"
        text = _text(row, "text") or _text(row, "output") or _text(row, "completion")
        if text:
            return text
        raise RowError("category", "missing category/summarised_text (or text/output)")
    for key in _FIELDS[task]:
        text = _text(row, key)
        if text:
            return library_text(task, text)
    raise RowError(_FIELDS[task][0], f"missing text (looked for {', '.join(_FIELDS[task])})")


def iter_rows(path: str | Path) -> Iterator[tuple[str, int, Any]]:
    """``(file, line/row number, row)`` from JSONL, JSON (list, or dict with data|items|rows),
    parquet, or a folder of those; streamed where the format allows."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in (".jsonl", ".json", ".parquet") and p.name != "manifest.json" and "rejected" not in p.name
        )
        if (path / "data").is_dir():
            files = sorted((path / "data").glob("*.parquet"))
        for f in files:
            yield from iter_rows(f)
        return
    if not path.exists():
        raise LmmixupError(f"{path}: no such file or folder")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield str(path), n, row
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield str(path), n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield str(path), n, RowError(None, f"invalid JSON: {e.msg}")
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LmmixupError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if isinstance(data, Mapping):
            data = next((data[k] for k in ("data", "items", "rows") if isinstance(data.get(k), list)), None)
            if data is None:
                raise LmmixupError(f"{path}: expected a JSON list or an object with data|items|rows")
        for n, row in enumerate(data, 1):
            yield str(path), n, row


def build_quality_library(args: LibraryArgs) -> dict:
    sources: list[tuple[str, str | None]] = [(p, None) for p in args.input]
    sources += [(getattr(args, t), t) for t in TASK_TYPES if getattr(args, t)]
    if not sources:
        raise LmmixupError("give --input and/or per-task files (--qa, --mcq, --tfq, --cs, --para)")
    run = StageRun("build-quality-library", args.out, inputs=[p for p, _ in sources], params=args)
    if run.is_complete():
        logger.info("build-quality-library: up to date, skipping (%s)", args.out)
        return run.manifest()

    texts: dict[str, list[str]] = {t: [] for t in TASK_TYPES}
    scores: dict[str, list[int]] = {t: [] for t in TASK_TYPES}
    n_in = 0
    for path, fixed_task in sources:
        for file, line, row in iter_rows(path):
            n_in += 1
            try:
                if isinstance(row, RowError):
                    raise row
                if not isinstance(row, Mapping):
                    raise RowError(None, f"expected a JSON object, got {type(row).__name__}")
                try:
                    task = normalize_task_type(fixed_task or row.get("task_type") or args.task_type)
                except ValueError as e:
                    raise RowError("task_type", str(e)) from None
                score = row_score(row, args.score_key)
                text = row_text(row, task, args.text_key)
            except RowError as e:
                run.quarantine.add(file, line, e.field, e.reason, row if not isinstance(row, RowError) else None)
                continue
            texts[task].append(text)
            scores[task].append(score)

    tasks = [t for t in TASK_TYPES if texts[t]]
    if not tasks:
        raise LmmixupError(f"no usable rated rows ({run.quarantine.summary()})")
    embedder = get_embedder(args.embedding_model, batch_size=args.batch_size, device=args.device)
    libraries = {}
    for task in tasks:
        emb = embedder.encode(texts[task], desc=f"library {task}")
        libraries[task] = build_task_library(task, emb, np.array(scores[task]), args.embedding_model, args.k_t)
        logger.info("library %s: %d items, classes %s", task, len(texts[task]), libraries[task].class_values.tolist())
    save_library(libraries, args.out, {"sources": [str(p) for p, _ in sources]})
    counts = {"rows_in": n_in, **{f"items_{t}": len(texts[t]) for t in tasks}}
    return run.finish(None, counts=counts, extra={"tasks": tasks, "embedding_model": args.embedding_model})
