"""Stage bookkeeping: fingerprints, manifests, skip-when-done and the scratch space for resuming.

Every stage writes ``<out>/data/*.parquet``, ``<out>/rejected.jsonl`` and, last of all,
``<out>/manifest.json``. A stage whose manifest fingerprint matches its inputs and parameters is
skipped; an interrupted stage finds its partial work under ``<out>/.work/`` and resumes from it.

What a stage is fingerprinted by is declared on its options: fields marked
``metadata={"fingerprint": False}`` (devices, batch sizes, concurrency, caches, ...) say how the
stage runs, not what it produces, so changing them leaves a finished stage up to date
(:func:`lmmixup_hf.options.fingerprint_params`); the manifest still records them.

Fingerprints are of content, never of places: an input is fingerprinted by what it holds (a file's
bytes, or a stage folder's *output* fingerprint, a hash of the parquet it wrote), and the path
options (``input``, ``out``, ...) stay out of the parameter hash. So a stage whose input changed in
any way (e.g. ``rate`` rerun until its failed rows were scored) reruns, and a run folder that was
moved or copied does not. A stage that finished with work left undone (rows the judge failed on)
says so in its manifest (``complete: false`` with the reason) and is never treated as up to date.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from datasets import Dataset

from lmmixup_hf import __version__
from lmmixup_hf.data.io import MANIFEST_NAME, Quarantine, read_stage_data, write_json, write_stage_data
from lmmixup_hf.options import fingerprint_params

logger = logging.getLogger(__name__)

MANIFEST = MANIFEST_NAME
REJECTED = "rejected.jsonl"
# secret-looking names: api_key, token, hf_token, access_token, secret, password, authorization;
# not max_new_tokens or tokenizer, which are ordinary parameters that must reach the fingerprint
_SECRET = re.compile(r"(api[_-]?key|(^|[_-])token$|secret|password|passwd|authorization|credential)", re.I)
# options that say where data lives, not what it is: the inputs are fingerprinted by content instead
LOCATION_KEYS = frozenset({"input", "out", "reference", "original", "distilled", "run_dir", "model_dir"})
_VERSIONED = ("datasets", "transformers", "sentence-transformers", "torch", "trl", "openai", "numpy")


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Drop secret-looking parameters, recursively: keys never reach manifests, cards or caches."""
    out = {}
    for k, v in params.items():
        if _SECRET.search(str(k)):
            continue
        out[k] = redact(v) if isinstance(v, Mapping) else v
    return out


def fingerprint_path(path: str | Path) -> str:
    """A content fingerprint: a stage folder's own fingerprint, or a sha256 of a file's bytes."""
    p = Path(path)
    if (p / MANIFEST).exists():
        m = json.loads((p / MANIFEST).read_text())
        return m.get("output_fingerprint") or m["fingerprint"]
    if p.is_file():
        return "sha256:" + _hash_file(hashlib.sha256(), p).hexdigest()
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
            st = f.stat()
            h.update(f"{f.relative_to(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return "dir:" + h.hexdigest()
    return "id:" + str(path)  # a Hub id or other reference


def content_fingerprint(folder: str | Path) -> str:
    """A hash of every parquet file a stage wrote under ``folder`` (hidden scratch folders aside):
    the same rows give the same bytes, so the same hash; any changed row changes it."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(
        f for f in folder.rglob("*.parquet") if not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\n".encode())
        _hash_file(h, f)
    return "out:" + h.hexdigest()[:32]


def _hash_file(h: Any, path: Path) -> Any:
    """Feed a file's bytes into ``h`` in 1 MiB chunks (large outputs never sit in memory)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def errors_name(path: str | Path) -> Iterator[None]:
    """A full disk reported without a file name (pyarrow's "No space left on device" has none)
    gets ``path``, the folder being written, so the one-line error says where."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL and not e.filename:
            e.filename = str(path)
        raise


def input_status(path: str | Path) -> str | None:
    """Why a stage folder is a partial input, or None: its manifest says work was left undone, or
    that it was itself built on a partial input (so partiality travels down the chain)."""
    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        return None
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if not m.get("complete", True):
        return m.get("incomplete") or "incomplete"
    if m.get("partial_inputs"):  # complete itself, but over a partial input: partial all the same
        return "built on an incomplete input (" + "; ".join(f"{p}: {w}" for p, w in m["partial_inputs"].items()) + ")"
    return None


def check_out_dir(out: str | Path) -> Path:
    """Fail early, in one line, when the output folder cannot be one (a file, or not writable)."""
    from lmmixup_hf.data.schema import LmmixupError

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise LmmixupError(f"--out {out}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmmixupError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise LmmixupError(f"--out {out}: the folder is not writable")
    return p


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "lmmixup-hf": __version__}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass
class StageRun:
    """One execution of a stage into ``out_dir``.

    >>> run = StageRun("rate", out, inputs=[pool], params=args, tags={"rubric_version": "v3"})
    >>> if run.is_complete(): return run.load()
    >>> ... work, checkpointing under run.work_dir ...
    >>> run.finish(rated, counts={"rated": n})
    """

    name: str
    out_dir: Path
    inputs: Sequence[str | Path] = ()
    # the stage's options dataclass (its fingerprint marks apply) or a plain mapping (all hashed)
    params: Any = field(default_factory=dict)
    # what changes the result without being an option (a prompt or rubric version): hashed and recorded
    tags: Mapping[str, Any] = field(default_factory=dict)
    quarantine: Quarantine = field(default_factory=Quarantine)

    def __post_init__(self) -> None:
        self.out_dir = check_out_dir(self.out_dir)
        options = self.params
        if is_dataclass(options):
            self.params, hashed = asdict(options), fingerprint_params(options)
        else:
            self.params, hashed = dict(options), dict(options)
        self.params = redact({**self.params, **self.tags})
        hashed = redact({**hashed, **self.tags})
        self.started = time.time()
        self.input_fingerprints = {str(p): fingerprint_path(p) for p in self.inputs}
        self.partial_inputs = {str(p): why for p in self.inputs if (why := input_status(p))}
        for p, why in self.partial_inputs.items():
            logger.warning("%s: input %s is incomplete (%s); this stage's output will be partial", self.name, p, why)
        hashed = {k: v for k, v in hashed.items() if k not in LOCATION_KEYS}
        payload = json.dumps(
            {"stage": self.name, "inputs": sorted(self.input_fingerprints.values()), "params": hashed},
            sort_keys=True,
            default=str,
        )
        self.fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:24]

    @property
    def work_dir(self) -> Path:
        """Scratch space for partial results; it is keyed by the fingerprint, so a changed
        parameter never resumes from incompatible work."""
        d = self.out_dir / ".work" / self.fingerprint
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest(self) -> dict[str, Any] | None:
        path = self.out_dir / MANIFEST
        return json.loads(path.read_text()) if path.exists() else None

    def is_complete(self) -> bool:
        """Done for these inputs and parameters, with no work left undone."""
        m = self.manifest()
        return bool(m) and m.get("fingerprint") == self.fingerprint and m.get("complete", True)

    def load(self, name: str = "data") -> Dataset:
        return read_stage_data(self.out_dir, name)

    def finish(
        self,
        data: Dataset | None,
        counts: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        splits: Mapping[str, Dataset] | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        """Write the outputs, then the manifest (last, so its presence means 'done').

        ``incomplete`` says what was left undone (e.g. rows the judge failed on): the stage is then
        not up to date, a rerun resumes it, and later stages see their input as partial."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if data is not None:
            write_stage_data(data, self.out_dir)
        for split_name, split in (splits or {}).items():
            write_stage_data(split, self.out_dir, name=split_name)
        self.quarantine.write(self.out_dir / REJECTED)
        seconds = time.time() - self.started
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "output_fingerprint": content_fingerprint(self.out_dir),
            "complete": incomplete is None,
            **({"incomplete": incomplete} if incomplete else {}),
            **({"partial_inputs": self.partial_inputs} if self.partial_inputs else {}),
            "inputs": self.input_fingerprints,
            "params": self.params,
            "counts": {**(counts or {}), "rejected": len(self.quarantine)},
            "rejected_by_reason": self.quarantine.counts(),
            "timing": {
                "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
                "seconds": round(seconds, 3),
            },
            "versions": package_versions(),
            **dict(extra or {}),
        }
        write_json(self.out_dir / MANIFEST, manifest)
        if self.quarantine:
            logger.warning("%s: %s (see %s)", self.name, self.quarantine.summary(), self.out_dir / REJECTED)
        return manifest
