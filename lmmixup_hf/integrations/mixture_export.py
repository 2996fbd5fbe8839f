"""``lmmixup mixture``: MIXTURE in the form the Hub loads with no code (parquet + dataset card).

``lmmixup mixture export --to parquet --out DIR`` builds every ``<task>-<stage>`` config with
:class:`~lmmixup_hf.integrations.mixture.Mixture` and writes::

    DIR/README.md                                   dataset card, YAML ``configs:`` for every config
    DIR/data/<config>/<split>-00000-of-00001.parquet

``all`` configs are not stored twice: their YAML entries list the task configs' files. A plain
``load_dataset(DIR, "qa-sft")`` (or ``load_dataset("<org>/mixture", ...)`` once pushed with
``lmmixup push``) then works. ``lmmixup mixture card --out README.md`` writes the card alone.
"""

from __future__ import annotations

import logging
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmmixup_hf.data.schema import TASK_TYPES, LmmixupError
from lmmixup_hf.integrations.mixture import (
    CITATION,
    HUB_REPO,
    SPLIT_SEED,
    STAGE_SPLITS,
    STAGES,
    Mixture,
    config_name,
)
from lmmixup_hf.options import Options

logger = logging.getLogger(__name__)

CARD_TEMPLATE = Path(__file__).with_name("mixture_card.jinja")
DEFAULT_DATASET_ID = "your-org/mixture"


@dataclass
class MixtureExportArgs(Options):
    out: str = field(metadata={"help": "Folder to write: README.md + data/<config>/<split>-*.parquet."})
    to: Literal["parquet"] = field(default="parquet", metadata={"help": "Output format."})
    data_dir: str | None = field(
        default=None, metadata={"help": f"Local MIXTURE mirror (default: the Hub repo {HUB_REPO})."}
    )
    tasks: list[str] = field(default_factory=lambda: list(TASK_TYPES), metadata={"help": "Task types to export."})
    stages: list[str] = field(default_factory=lambda: list(STAGES), metadata={"help": "Stages to export."})
    dataset_id: str = field(default=DEFAULT_DATASET_ID, metadata={"help": "Hub id the card's examples load."})
    repo_id: str = field(default=HUB_REPO, metadata={"help": "Hub repo to read when --data_dir is not given."})
    revision: str = field(default="main", metadata={"help": "Revision of --repo_id."})
    seed: int = field(default=SPLIT_SEED, metadata={"help": "Seed of the GRPO shuffle.", "range": "[0, inf)"})
    max_shard_rows: int = field(default=100_000, metadata={"help": "Rows per parquet file.", "range": "[1, inf)"})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache (default: the HF cache)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace README.md and data/ in a non-empty --out."})


@dataclass
class MixtureCardArgs(Options):
    out: str = field(metadata={"help": "Where to write the card (e.g. dataset_scripts/mixture/README.md)."})
    dataset_id: str = field(default=DEFAULT_DATASET_ID, metadata={"help": "Hub id the card's examples load."})


# -- the card ----------------------------------------------------------------------------------
def _shard_glob(name: str, split: str) -> str:
    return f"data/{name}/{split}-*.parquet"


def card_configs(tasks: list[str], stages: list[str]) -> list[dict]:
    """The YAML ``configs:`` entries: one per task x stage, plus ``all`` ones listing their files."""
    configs = []
    for stage in stages:
        splits = list(STAGE_SPLITS[stage])
        for task in tasks:
            name = config_name(task, stage)
            configs.append(
                {"config_name": name, "data_files": [{"split": s, "path": _shard_glob(name, s)} for s in splits]}
            )
        name = config_name("all", stage)
        files = [{"split": s, "path": [_shard_glob(config_name(t, stage), s) for t in tasks]} for s in splits]
        configs.append({"config_name": name, "data_files": files, **({"default": True} if name == "all" else {})})
    return configs


def _sizes_table(sizes: dict[str, dict[str, int]]) -> str:
    order = ["train", "validation", "test", "grpo_train", "grpo_test"]
    present = {s for per in sizes.values() for s in per}
    splits = [s for s in order if s in present] + sorted(present - set(order))
    rows = ["| config | " + " | ".join(splits) + " |", "| --- |" + " ---: |" * len(splits)]
    for name, per in sizes.items():
        rows.append(f"| `{name}` | " + " | ".join(f"{per[s]:,}" if s in per else "" for s in splits) + " |")
    return "\n".join(rows)


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def render_card(
    sizes: dict[str, dict[str, int]] | None = None,
    dataset_id: str = DEFAULT_DATASET_ID,
    tasks: list[str] | None = None,
    stages: list[str] | None = None,
    seed: int = SPLIT_SEED,
    exported_from: str = HUB_REPO,
):
    """The MIXTURE dataset card (huggingface_hub ``DatasetCard``); ``sizes`` adds the size table."""
    from huggingface_hub import DatasetCard, DatasetCardData

    tasks, stages = list(tasks or TASK_TYPES), list(stages or STAGES)
    extra = {}
    if sizes:
        raw = sizes.get(config_name("all", "raw"), {})
        extra["size_categories"] = [_size_category(raw.get("train", 0) + raw.get("test", 0))] if raw else None
    data = DatasetCardData(
        pretty_name="MIXTURE",
        language=["en"],
        license="unknown",
        task_categories=["text-generation"],
        tags=["lm-mixup", "instruction-distillation", "data-augmentation", "synthetic"],
        source_datasets=[HUB_REPO],
        configs=card_configs(tasks, stages),
        **{k: v for k, v in extra.items() if v},
    )
    return DatasetCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        dataset_id=dataset_id,
        source_repo=HUB_REPO,
        seed=seed,
        sizes_table=_sizes_table(sizes) if sizes else "",
        exported_from=exported_from,
        citation=CITATION,
    )


# -- export ------------------------------------------------------------------------------------
def _build(name: str, args: MixtureExportArgs):
    from datasets.exceptions import DatasetGenerationError

    builder = Mixture(
        config_name=name,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        hub_repo=args.repo_id,
        revision=args.revision,
        seed=args.seed,
    )
    try:
        builder.download_and_prepare()
    except DatasetGenerationError as e:  # surface the row-level cause, not the wrapper
        if isinstance(e.__cause__, LmmixupError):
            raise e.__cause__ from None
        raise
    return builder.as_dataset()


def _write_split(ds, folder: Path, split: str, max_rows: int) -> int:
    n = max(1, math.ceil(len(ds) / max_rows))
    for i in range(n):
        shard = ds.select(range(i * max_rows, min(len(ds), (i + 1) * max_rows)))
        shard.to_parquet(str(folder / f"{split}-{i:05d}-of-{n:05d}.parquet"))
    return len(ds)


def export(args: MixtureExportArgs) -> Path:
    """Write the parquet + card layout; returns the output folder."""
    if args.to != "parquet":
        raise LmmixupError(f"--to {args.to!r}: only parquet is supported")
    unknown = sorted(set(args.tasks) - set(TASK_TYPES)) + sorted(set(args.stages) - set(STAGES))
    if unknown:
        raise LmmixupError(f"unknown task type(s) or stage(s): {', '.join(unknown)}")
    out = Path(args.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise LmmixupError(f"{out} is not empty; pass --overwrite to replace its README.md and data/")
    tasks = [t for t in TASK_TYPES if t in args.tasks]
    stages = [s for s in STAGES if s in args.stages]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    sizes: dict[str, dict[str, int]] = {}
    try:
        for stage in stages:
            for task in tasks:
                name = config_name(task, stage)
                folder = tmp / "data" / name
                folder.mkdir(parents=True)
                dsd = _build(name, args)
                sizes[name] = {
                    split: _write_split(ds, folder, split, args.max_shard_rows) for split, ds in dsd.items()
                }
                logger.info("mixture export: %s %s", name, sizes[name])
            total = {s: sum(sizes[config_name(t, stage)][s] for t in tasks) for s in STAGE_SPLITS[stage]}
            sizes[config_name("all", stage)] = total
        origin = f"a local mirror of {HUB_REPO}" if args.data_dir else f"{args.repo_id}@{args.revision}"
        card = render_card(sizes, args.dataset_id, tasks, stages, args.seed, origin)
        card.save(str(tmp / "README.md"))
        out.mkdir(parents=True, exist_ok=True)
        for part in ("data", "README.md"):
            old = out / part
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
            (tmp / part).rename(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("mixture export: wrote %d configs to %s", len(card_configs(tasks, stages)), out)
    return out


def write_card(args: MixtureCardArgs) -> Path:
    render_card(dataset_id=args.dataset_id).save(args.out)
    return Path(args.out)
