"""MIXTURE, the LM-mixup training set, as a ``datasets`` builder.

``datasets`` >= 4 no longer runs loading scripts, so the builder lives in this package:

- ``Mixture(config_name="qa-sft", data_dir=...)`` works directly (``download_and_prepare`` +
  ``as_dataset``);
- importing :mod:`lmmixup_hf` calls :func:`register`, after which
  ``load_dataset("mixture", "qa", data_dir=...)`` (streaming included) uses it;
- ``lmmixup mixture export`` writes the parquet + card form that loads with no code at all.

It reads the Hub repo ``dokiik/MIXTURE`` or a local mirror with the same layout::

    data_sft/<task>/merged_{train,test}_<task>_noisy.json   instruction, input, cot, output (+ id, source)
    data_grpo/llm_mixup/{train,test}.json                   input, output, task_type (<task>_mixup)

Configs are ``<scope>`` or ``<scope>-<stage>``: scope is a task type or ``all``; stage is ``raw``
(the default: the files as they are), ``sft`` or ``grpo`` (the reference code's cold-start /
reinforcement split of the train files, see :func:`split_sft_grpo`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import datasets
from datasets.utils.file_utils import xopen

from lmmixup_hf.data.schema import TASK_TYPES, LmmixupError, make_id, normalize_task_type

logger = logging.getLogger(__name__)

HUB_REPO = "dokiik/MIXTURE"
BUILDER_NAME = "mixture"
STAGES = ("raw", "sft", "grpo")
DEFAULT_STAGE = "raw"
SCOPES = (*TASK_TYPES, "all")

SPLIT_SEED = 42
SFT_FRACTION = 0.3
GRPO_TEST_FRACTION = 0.1

GRPO_FILES = {"train": "data_grpo/llm_mixup/train.json", "test": "data_grpo/llm_mixup/test.json"}

# the splits each stage produces; the value says where rows come from
STAGE_SPLITS: dict[str, dict[str, str]] = {
    "raw": {"train": "train", "test": "test", "grpo_train": "published:train", "grpo_test": "published:test"},
    "sft": {"train": "train:sft", "test": "test"},
    "grpo": {"train": "train:grpo_train", "validation": "train:grpo_test", "test": "test"},
}

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "task_type": datasets.Value("string"),
        "source": datasets.Value("string"),
        "instruction": datasets.Value("string"),
        "input": datasets.Value("string"),
        "members": datasets.List(datasets.Value("string")),
        "output": datasets.Value("string"),
        "cot": datasets.Value("string"),
    }
)

CITATION = """\
@misc{mixture_dataset,
  title        = {MIXTURE},
  howpublished = {\\url{https://huggingface.co/datasets/dokiik/MIXTURE}},
  note         = {Training data of the LM-mixup paper; reference code at https://github.com/yuu250/LM-mixup.
                  Cite the paper itself with the BibTeX given in the paper.}
}
"""

DESCRIPTION = (
    "MIXTURE: clusters of low-quality, noisy variants of an instruction sample (input), each paired "
    "with one high-quality target (output) and a reasoning trace (cot), for five task types "
    "(qa, mcq, tfq, cs, para). Used to train LM-mixup instruction distillers."
)


def sft_file(task: str, split: str) -> str:
    """Relative path of one MIXTURE SFT file, e.g. ``data_sft/qa/merged_train_qa_noisy.json``."""
    return f"data_sft/{task}/merged_{split}_{task}_noisy.json"


def config_name(scope: str, stage: str = DEFAULT_STAGE) -> str:
    """``qa`` for the default stage, ``qa-sft`` / ``all-grpo`` otherwise."""
    return scope if stage == DEFAULT_STAGE else f"{scope}-{stage}"


CONFIG_NAMES = tuple(config_name(scope, stage) for stage in STAGES for scope in SCOPES)


# -- the reference split -----------------------------------------------------------------------
T = TypeVar("T")


@dataclass(frozen=True)
class MixtureSplit(Generic[T]):
    sft: list[T]
    grpo_train: list[T]
    grpo_test: list[T]


def split_sft_grpo(
    records: Sequence[T],
    seed: int = SPLIT_SEED,
    sft_fraction: float = SFT_FRACTION,
    test_fraction: float = GRPO_TEST_FRACTION,
) -> MixtureSplit[T]:
    """The reference code's split of one ``merged_train_<task>_noisy.json``.

    The first ``int(sft_fraction * n)`` records in file order go to cold-start SFT; the rest is
    shuffled with ``random.Random(seed)`` and its first ``max(1, int(test_fraction * m))`` records
    become the GRPO test (validation) set, the others GRPO train. Works on any sequence (records,
    indices), and is reproducible from the seed alone.
    """
    import random

    cut = int(sft_fraction * len(records))
    sft, rest = list(records[:cut]), list(records[cut:])
    random.Random(seed).shuffle(rest)
    k = min(len(rest), max(1, int(test_fraction * len(rest))))
    return MixtureSplit(sft=sft, grpo_train=rest[k:], grpo_test=rest[:k])


def merge_instruction(instruction: str, text: str) -> str:
    """The GRPO prompt text: ``instruction + "\\n\\n" + input``, each stripped first, either alone if
    the other is empty (as the reference built its GRPO files)."""
    instruction, text = instruction.strip(), text.strip()
    return f"{instruction}\n\n{text}" if instruction and text else instruction or text


# -- members -----------------------------------------------------------------------------------
_BLOCKS = re.compile(r"\n[ \t]*\n+")
_MEMBER_START = re.compile(r"Q\s*:")


def parse_members(text: str) -> list[str]:
    """Split a linearised cluster back into its members.

    Members are ``Q: ... / A: ...`` pairs separated by blank lines. A block that does not start
    with ``Q:`` continues the previous member (an answer may contain a blank line); text before the
    first ``Q:`` (an instruction merged into the input) is not a member. Inputs with no ``Q:`` at
    all are split on blank lines.
    """
    blocks = [b.strip() for b in _BLOCKS.split(text.replace("\r\n", "\n").replace("\r", "\n"))]
    blocks = [b for b in blocks if b]
    if not any(_MEMBER_START.match(b) for b in blocks):
        return blocks
    members: list[str] = []
    for block in blocks:
        if _MEMBER_START.match(block):
            members.append(block)
        elif members:
            members[-1] += "\n\n" + block
    return members


# -- rows --------------------------------------------------------------------------------------
class MixtureUnavailableError(LmmixupError, ConnectionError):
    """A MIXTURE file cannot be found or fetched (missing from the mirror, Hub unreachable)."""


class MixtureFormatError(LmmixupError, ValueError):
    """A MIXTURE file or row does not have the expected structure."""

    def __init__(self, file: str, index: int | None, field: str | None, reason: str):
        where = file if index is None else f"{file}, row {index}"
        super().__init__(f"{where}" + (f", field {field!r}" if field else "") + f": {reason}")
        self.file, self.index, self.field, self.reason = file, index, field, reason


def _text(row: dict, field: str, required: bool, where: tuple[str, int]) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise MixtureFormatError(*where, field, "missing")
        return ""
    if not isinstance(value, str):
        raise MixtureFormatError(*where, field, f"expected a string, got {type(value).__name__}")
    return value


def to_example(row: Any, task: str | None, merge: bool, where: tuple[str, int]) -> dict[str, Any]:
    """Map one MIXTURE record onto our columns; ``task=None`` reads it from ``task_type``."""
    if not isinstance(row, dict):
        raise MixtureFormatError(*where, None, f"expected a JSON object, got {type(row).__name__}")
    text = _text(row, "input", True, where)
    output = _text(row, "output", True, where)
    instruction = _text(row, "instruction", False, where)
    cot = _text(row, "cot", False, where)
    if task is None:
        name = _text(row, "task_type", True, where)
        try:
            task = normalize_task_type(name)
        except ValueError as e:
            raise MixtureFormatError(*where, "task_type", str(e)) from None
    rid = row.get("id")
    if rid is None or rid == "":
        rid = make_id(text, output)
    elif isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    elif not isinstance(rid, str):
        raise MixtureFormatError(*where, "id", f"expected a string or an integer, got {type(rid).__name__}")
    source = _text(row, "source", False, where) or task
    if merge:
        text, instruction = merge_instruction(instruction, text), ""
    return {
        "id": rid,
        "task_type": task,
        "source": source,
        "instruction": instruction,
        "input": text,
        "members": parse_members(text),
        "output": output,
        "cot": cot,
    }


def read_records(path: str, label: str, download_config: Any = None) -> list:
    """Load one MIXTURE JSON array (local path or URL); ``label`` names it in errors."""
    try:
        with xopen(path, "r", encoding="utf-8", download_config=download_config) as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise MixtureFormatError(
            label, None, None, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise MixtureFormatError(label, None, None, f"not UTF-8 text ({e})") from None
    except (OSError, ValueError) as e:
        hint = "; pass data_dir=<local mirror> to read a local copy" if "://" in label else ""
        raise MixtureUnavailableError(f"{label}: cannot be read ({type(e).__name__}: {e}){hint}") from e
    if not isinstance(records, list):
        raise MixtureFormatError(label, None, None, f"expected a JSON array of records, got {type(records).__name__}")
    return records


@dataclass(frozen=True)
class _Source:
    """One file feeding one split: which rows (``select``) and how to map them."""

    path: str  # what to open (local path or URL)
    label: str  # how errors name it
    tasks: tuple[str, ...]  # for the pooled GRPO files: the task types to keep, in this order
    select: str  # all | sft | grpo_train | grpo_test
    merge: bool  # merge the instruction into the input (GRPO stage)
    published: bool  # a data_grpo file (task_type per row) rather than a per-task SFT file


def _examples(src: _Source, seed: int, download_config: Any = None) -> Iterator[tuple[str, dict[str, Any]]]:
    records = read_records(src.path, src.label, download_config)
    name = src.label.rsplit("/", 1)[-1]
    if src.published:
        rows = [(i, to_example(r, None, src.merge, (src.label, i))) for i, r in enumerate(records)]
        for task in src.tasks:  # grouped by task, file order within a task
            for i, ex in rows:
                if ex["task_type"] == task:
                    yield f"{name}:{i}", ex
        return
    (task,) = src.tasks
    # every row is checked, not only the selected ones: a config must not load or fail
    # depending on which side of the split a broken row falls
    examples = [to_example(r, task, src.merge, (src.label, i)) for i, r in enumerate(records)]
    indices: Sequence[int] = range(len(records))
    if src.select != "all":
        indices = getattr(split_sft_grpo(indices, seed=seed), src.select)
    for i in indices:
        yield f"{name}:{i}", examples[i]


# -- the builder -------------------------------------------------------------------------------
@dataclass
class MixtureConfig(datasets.BuilderConfig):
    """``scope``: a task type or ``all``; ``stage``: raw | sft | grpo. ``hub_repo``/``revision``
    name the Hub source used when no ``data_dir`` is given; ``seed`` drives the GRPO shuffle."""

    scope: str = "all"
    stage: str = DEFAULT_STAGE
    hub_repo: str = HUB_REPO
    revision: str = "main"
    seed: int = SPLIT_SEED

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in SCOPES:
            raise ValueError(f"unknown MIXTURE scope {self.scope!r}; expected one of {', '.join(SCOPES)}")
        if self.stage not in STAGES:
            raise ValueError(f"unknown MIXTURE stage {self.stage!r}; expected one of {', '.join(STAGES)}")


class Mixture(datasets.GeneratorBasedBuilder):
    """MIXTURE from ``dokiik/MIXTURE`` or a local mirror (``data_dir=``), one config per scope x stage."""

    VERSION = datasets.Version("1.0.1")  # 1.0.1: merged GRPO inputs strip instruction and input
    BUILDER_CONFIG_CLASS = MixtureConfig
    BUILDER_CONFIGS = [
        MixtureConfig(
            name=config_name(scope, stage),
            scope=scope,
            stage=stage,
            version=datasets.Version("1.0.1"),
            description=f"MIXTURE, {'all task types' if scope == 'all' else scope}, {stage} stage",
        )
        for stage in STAGES
        for scope in SCOPES
    ]
    DEFAULT_CONFIG_NAME = "all"

    def __init__(self, *args, data_dir: str | None = None, data_files: Any = None, **kwargs):
        # a local mirror: key the cache on its files (paths + modification times), so an edited
        # mirror is rebuilt instead of served stale
        if data_dir and data_files is None and "://" not in str(data_dir) and os.path.isdir(data_dir):
            try:
                data_files = datasets.data_files.DataFilesDict.from_patterns(
                    {"mirror": ["data_sft/**/*.json", "data_grpo/**/*.json"]}, base_path=str(data_dir)
                )
            except FileNotFoundError:
                pass  # _split_generators says which file is missing
        super().__init__(*args, data_dir=data_dir, data_files=data_files, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=DESCRIPTION,
            features=FEATURES,
            homepage=f"https://huggingface.co/datasets/{HUB_REPO}",
            citation=CITATION,
        )

    # where each relative file lives: the local mirror, or the Hub repo
    def _locate(self, rel: str) -> tuple[str, str]:
        base = self.config.data_dir
        if base:
            base = str(base)
            if "://" in base:
                url = base.rstrip("/") + "/" + rel
                return url, url
            path = os.path.join(os.path.expanduser(base), rel)
            if not os.path.isfile(path):
                raise MixtureUnavailableError(
                    f"{path}: missing; data_dir={base!r} must have the layout of the Hub repo {HUB_REPO} "
                    "(data_sft/<task>/merged_{train,test}_<task>_noisy.json, data_grpo/llm_mixup/{train,test}.json)"
                )
            return path, path
        url = f"hf://datasets/{self.config.hub_repo}@{self.config.revision}/{rel}"
        return url, url

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        cfg = self.config
        if not cfg.data_dir and cfg.data_files:
            raise LmmixupError(
                "MIXTURE reads a folder with the Hub repo's layout: pass data_dir=<mirror> instead of data_files "
                f"(or neither, to read {cfg.hub_repo} from the Hub)"
            )
        tasks = TASK_TYPES if cfg.scope == "all" else (cfg.scope,)
        wanted = STAGE_SPLITS[cfg.stage]
        rels: dict[str, str] = {}
        for origin in wanted.values():
            kind = origin.split(":")[0]
            if kind == "published":
                rel = GRPO_FILES[origin.split(":")[1]]
                rels[rel] = rel
            else:
                for task in tasks:
                    rel = sft_file(task, kind)
                    rels[rel] = rel
        located = {rel: self._locate(rel) for rel in rels}
        try:
            paths = dl_manager.download({rel: loc[0] for rel, loc in located.items()})
        except Exception as e:
            if cfg.data_dir:
                raise
            raise MixtureUnavailableError(
                f"could not fetch MIXTURE from the Hub repo {cfg.hub_repo}@{cfg.revision} ({type(e).__name__}: {e}). "
                "To read a local copy, pass data_dir=<folder with data_sft/ and data_grpo/>."
            ) from e

        generators = []
        for split, origin in wanted.items():
            kind, _, select = origin.partition(":")
            merge = cfg.stage == "grpo"
            if kind == "published":
                rel = GRPO_FILES[select]
                sources = [_Source(paths[rel], located[rel][1], tasks, "all", False, True)]
            else:
                sources = [
                    _Source(
                        paths[sft_file(t, kind)], located[sft_file(t, kind)][1], (t,), select or "all", merge, False
                    )
                    for t in tasks
                ]
            gen_kwargs = {"sources": sources, "download_config": getattr(dl_manager, "download_config", None)}
            generators.append(datasets.SplitGenerator(name=split, gen_kwargs=gen_kwargs))
        return generators

    def _generate_examples(self, sources: list[_Source], download_config: Any = None) -> Iterator[tuple[str, dict]]:
        for src in sources:
            yield from _examples(src, self.config.seed, download_config)


# -- registration ------------------------------------------------------------------------------
SUPPORTED_DATASETS_MAJOR = (4, 5)  # the private API below was checked on these major versions


def _datasets_major() -> int | None:
    try:
        return int(str(datasets.__version__).split(".")[0])
    except ValueError:
        return None


def register(name: str = BUILDER_NAME) -> bool:
    """Make ``load_dataset(name, ...)`` use :class:`Mixture`.

    ``datasets`` has no public hook for this, so it adds the module to the table of packaged builders
    (like ``json`` or ``parquet``), and makes a call without ``data_dir``/``data_files`` read the
    Hub repo instead of listing the current directory. Both are private APIs: the function does
    nothing (and returns False) on a ``datasets`` major version it was not checked against, or when
    the internals moved; ``Mixture(...)`` and the exported parquet form work regardless.
    """
    major = _datasets_major()
    if major not in SUPPORTED_DATASETS_MAJOR:
        logger.warning(
            "datasets %s is not a version lmmixup_hf was checked against; load_dataset(%r) is not registered. "
            "Use lmmixup_hf.integrations.mixture.Mixture(...) or the exported parquet form instead.",
            datasets.__version__,
            name,
        )
        return False
    try:
        from datasets import load as _load
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES, _hash_python_lines

        factory = _load.PackagedDatasetModuleFactory
        _load.DatasetModule  # noqa: B018 - fail here, not at load time, if it moved
    except (ImportError, AttributeError) as e:
        logger.warning("cannot register load_dataset(%r): datasets internals changed (%s)", name, e)
        return False
    module = sys.modules[__name__]
    _PACKAGED_DATASETS_MODULES[name] = (module.__name__, _hash_python_lines(inspect.getsource(module).splitlines()))
    _OWN_NAMES.add(name)
    if not getattr(factory.get_module, "_lmmixup_wrapped", False):
        factory.get_module = _wrap_get_module(factory.get_module, _load.DatasetModule)
    return True


_OWN_NAMES: set[str] = set()


def _wrap_get_module(get_module, dataset_module_cls):
    """For our names with neither ``data_dir`` nor ``data_files``, skip the listing of the current
    directory that packaged builders do, so the builder goes to the Hub repo."""

    def wrapped(self):
        if self.name in _OWN_NAMES and self.data_dir is None and self.data_files is None:
            from datasets.data_files import DataFilesDict
            from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

            module_path, module_hash = _PACKAGED_DATASETS_MODULES[self.name]
            return dataset_module_cls(
                module_path, module_hash, {"data_files": DataFilesDict(), "dataset_name": self.name}
            )
        return get_module(self)

    wrapped._lmmixup_wrapped = True
    wrapped.__wrapped__ = get_module
    return wrapped


def unregister(name: str = BUILDER_NAME) -> None:
    """Undo :func:`register` for ``name`` (tests; a shadowed local folder of the same name)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if name in _OWN_NAMES:
        _PACKAGED_DATASETS_MODULES.pop(name, None)
        _OWN_NAMES.discard(name)


register()  # importing this module means datasets is loaded: make load_dataset("mixture") work now
