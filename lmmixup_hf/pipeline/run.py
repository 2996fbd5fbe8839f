"""``lmmixup run``: the whole pipeline from one YAML config, every stage resumable.

The chain is ingest -> rate -> split (high/low) -> cluster -> distill (and parse) -> rerate ->
filter -> longtail -> mix -> report. Each stage is the same function that its own ``lmmixup <stage>`` command
runs, called with its own arguments dataclass; this module only validates the config, wires each
stage's input to the previous stage's output under ``runs/<name>/<stage>/`` and shows one progress
line per stage. Skipping and resuming are the stages' own (:class:`~lmmixup_hf.pipeline.workflow.StageRun`):
a stage whose manifest matches is skipped, an interrupted one resumes from its scratch space.
Where the stages' parallel work runs is the executor's business (``executor: local | ray``, see
:mod:`lmmixup_hf.pipeline.executors`); the outputs are the same rows either way.

A config has top-level keys (:class:`RunConfig`) and one section per stage whose keys are that
stage's own options (the fields of its ``XArgs`` dataclass, the same as its command-line flags):

>>> name: demo
>>> input: data/sample_pool.jsonl
>>> embedding_model: minilm-offline     # default for every stage that embeds
>>> rate: {engine: local, judge_model: smollm2-135m-offline}
>>> cluster: {min_size: 2, max_size: 6}
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmmixup_hf.data.io import write_json
from lmmixup_hf.data.schema import EXIT_OK, EXIT_PARTIAL, LmmixupError
from lmmixup_hf.options import Options, from_mapping, suggest
from lmmixup_hf.pipeline.executors import RayOptions
from lmmixup_hf.pipeline.registry import STAGE_NAMES, STAGES, Stage
from lmmixup_hf.pipeline.registry import stage as stage_named
from lmmixup_hf.pipeline.workflow import MANIFEST, errors_name, input_status

logger = logging.getLogger(__name__)


def wiring(name: str, run_dir: Path, input_path: str, off: Collection[str] = ()) -> dict[str, Any]:
    """The options the pipeline sets itself: where each stage reads and writes (as declared in
    :mod:`lmmixup_hf.pipeline.registry`; ``off``: opt-in stages that are not on)."""
    return stage_named(name).wiring(run_dir, input_path, off)


# Top-level keys that become every stage's default for an option of the same name.
SHARED_KEYS = ("embedding_model", "seed", "device", "batch_size", "num_proc")


# -- config ---------------------------------------------------------------------------------------
@dataclass
class RunConfig(Options):
    """Top-level keys of a pipeline config; everything else is a stage section."""

    input: str
    name: str | None = None
    out_dir: str | None = None
    embedding_model: str | None = None
    seed: int | None = None
    device: str | None = None
    batch_size: int | None = None
    num_proc: int | None = None
    allow_partial: bool = False  # go on to the next stage when rows were left failed (e.g. by the judge)
    executor: Literal["local", "ray"] = "local"  # where the stages' parallel work runs
    ray: RayOptions = field(default_factory=RayOptions)  # the Ray executor's options
    description: str | None = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


@dataclass
class RunArgs(Options):
    config: str = field(default="configs/demo.yaml", metadata={"help": "Pipeline YAML."})
    name: str | None = field(default=None, metadata={"help": "Override the run name (output under runs/<name>)."})
    out_dir: str | None = field(default=None, metadata={"help": "Override the run folder."})
    input: str | None = field(default=None, metadata={"help": "Override the input pool."})
    from_stage: Literal[STAGE_NAMES] | None = field(  # type: ignore[valid-type]
        default=None, metadata={"aliases": ["--from"], "help": "First stage to run."}
    )
    to_stage: Literal[STAGE_NAMES] | None = field(  # type: ignore[valid-type]
        default=None, metadata={"aliases": ["--to"], "help": "Last stage to run."}
    )
    only: Literal[STAGE_NAMES] | None = field(  # type: ignore[valid-type]
        default=None, metadata={"help": "Run just this stage (its inputs must exist)."}
    )
    executor: Literal["local", "ray"] | None = field(
        default=None,
        metadata={
            "help": "Where the stages' parallel work runs: local (this process) or ray (a Ray cluster; "
            "see the config's `ray:` section). Default: the config's `executor`, else local."
        },
    )
    allow_partial: bool | None = field(
        default=None,
        metadata={
            "help": "Go on to the next stage when a stage left rows failed (default: the config's allow_partial, "
            "else stop; rerun to retry the failed rows)."
        },
    )


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read and check a pipeline YAML's top-level keys (the stage sections are checked by
    :func:`stage_args`); every problem names the file, the key and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise LmmixupError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmmixupError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise LmmixupError(f"{path}: expected a mapping of keys to values, got {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})

    top = {f.name for f in dataclasses.fields(RunConfig) if f.init}
    unknown = sorted(set(raw) - top - set(STAGE_NAMES))
    if unknown:
        raise LmmixupError(
            f"{path}: {unknown[0]}: unknown key{suggest(unknown[0], [*top, *STAGE_NAMES])}; top-level keys are "
            f"{', '.join(sorted(top))} and the stage sections {', '.join(STAGE_NAMES)}"
        )
    if "input" not in raw:
        raise LmmixupError(f"{path}: missing required key `input` (the pool to run on)")
    cfg = from_mapping(RunConfig, {k: v for k, v in raw.items() if k in top}, f"{path}: ")
    for name in STAGE_NAMES:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise LmmixupError(f"{path}: {name}: expected a mapping of {name} options, got {type(section).__name__}")
        cfg.sections[name] = section
    cfg.name = cfg.name or path.stem
    _check_input(cfg.input, path)
    return cfg


def _check_input(source: str, config_path: Path) -> None:
    p = Path(source)
    looks_local = p.suffix or source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_local and not p.exists():
        raise LmmixupError(f"{config_path}: input: {source}: no such file or folder")


def command_of(stage: Stage) -> str:
    """The ``lmmixup`` command that runs a stage on its own (rerate is ``lmmixup rate``)."""
    return "rate" if stage.name == "rerate" else stage.name


def stage_args(stage: Stage, cfg: RunConfig, config_path: str | Path = "config") -> Any:
    """Build one stage's arguments: shared defaults < its config section < the pipeline's wiring,
    through the same parser as the stage's own command (so the same checks, the same objects)."""
    from lmmixup_hf.pipeline.options import OptionsParser

    cls = getattr(_import(stage), stage.args)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    section = dict(cfg.sections.get(stage.name, {}))
    if stage.name == "rerate":  # the same judge as `rate` unless told otherwise; distilled rows carry no scores
        carried = ("scores_from", "score_scale")
        section = {**{k: v for k, v in cfg.sections.get("rate", {}).items() if k not in carried}, **section}
    off = [s.name for s in STAGES if not _enabled(cfg, s)]
    wired = wiring(stage.name, cfg.run_dir, cfg.input, off)
    missing = sorted(set(wired) - fields)
    if missing:
        raise LmmixupError(f"stage {stage.name}: {stage.module}.{stage.args} has no option(s) {', '.join(missing)}")
    for key in section:
        if key in wired:
            raise LmmixupError(
                f"{config_path}: {stage.name}.{key}: set by the pipeline (each stage reads the previous stage's output)"
            )
    shared = {key: getattr(cfg, key) for key in SHARED_KEYS if getattr(cfg, key) is not None and key in fields}
    defaults = {k: v for k, v in stage.defaults.items() if k in fields}
    values = {**shared, **defaults, **section, **wired}

    def name(key: str) -> str:  # what the user wrote: a top-level shared key or the stage's section key
        shared_only = key in shared and key not in section and key not in defaults
        return f"{config_path}: {key}" if shared_only else f"{config_path}: {stage.name}.{key}"

    command = command_of(stage)
    return OptionsParser(cls, prog=f"lmmixup {command}").parse_dict(values, name, what=f"`lmmixup {command}`")


def _enabled(cfg: RunConfig, stage: Stage) -> bool:
    """An opt-in stage (declared with ``enabled`` off) is on when its section says so."""
    return bool(cfg.sections.get(stage.name, {}).get("enabled", stage.defaults.get("enabled", True)))


class _MissingStage(LmmixupError):
    pass


def _import(stage: Stage) -> Any:
    try:
        return importlib.import_module(stage.module)
    except ModuleNotFoundError as e:
        raise _MissingStage(f"stage {stage.name}: cannot import {stage.module} ({e})") from None


# -- running --------------------------------------------------------------------------------------
def select_stages(from_stage: str | None, to_stage: str | None, only: str | None) -> list[Stage]:
    """The stages to run, in order (the names are checked here too, for callers in Python)."""
    for flag, value in (("--from", from_stage), ("--to", to_stage), ("--only", only)):
        if value is not None and value not in STAGE_NAMES:
            raise LmmixupError(f"{flag} {value}: unknown stage; stages are {', '.join(STAGE_NAMES)}")
    if only and (from_stage or to_stage):
        raise LmmixupError("--only cannot be combined with --from/--to")
    first = STAGE_NAMES.index(only or from_stage or STAGE_NAMES[0])
    last = STAGE_NAMES.index(only or to_stage or STAGE_NAMES[-1])
    if first > last:
        raise LmmixupError(f"--from {STAGE_NAMES[first]} comes after --to {STAGE_NAMES[last]}")
    return list(STAGES[first : last + 1])


def run(args: RunArgs) -> int:
    """Run the selected stages in order; already finished ones skip themselves."""
    overrides = {
        "name": args.name,
        "out_dir": args.out_dir,
        "input": args.input,
        "allow_partial": args.allow_partial,
        "executor": args.executor,
    }
    if args.name and not args.out_dir:
        overrides["out_dir"] = f"runs/{args.name}"
    cfg = load_config(args.config, overrides)
    stages = select_stages(args.from_stage, args.to_stage, args.only)
    # Validate every section up front, so a typo in `mix` fails before an hour of rating.
    all_args = {}
    for s in STAGES:
        try:
            all_args[s.name] = stage_args(s, cfg, args.config)
        except _MissingStage as e:
            if s in stages:
                raise
            logger.warning("%s (not selected, so not needed now)", e)
    _require_upstream(stages[0], cfg.run_dir, skip={n for n, a in all_args.items() if not getattr(a, "enabled", True)})

    import datasets

    datasets.disable_progress_bars()  # the stages' own bars are the progress display; not parquet I/O
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(_resolved(cfg, all_args), sort_keys=False))
    logger.info(
        "run %s: %d stage(s) %s -> %s (executor: %s)",
        cfg.name,
        len(stages),
        "/".join(s.name for s in stages),
        cfg.run_dir,
        cfg.executor,
    )
    from lmmixup_hf.pipeline.executors import make_executor

    executor = make_executor(cfg.executor, cfg.ray)
    try:
        return _run_stages(cfg, stages, all_args, executor)
    finally:
        executor.close()


def _run_stages(cfg: RunConfig, stages: list[Stage], all_args: Mapping[str, Any], executor: Any) -> int:
    started = time.time()
    partial: dict[str, str] = {}
    for i, stage in enumerate(stages, start=1):
        t0 = time.time()
        logger.info("[%d/%d] %s: %s", i, len(stages), stage.name, stage.help)
        func: Callable[..., Any] = getattr(_import(stage), stage.func)
        with errors_name(cfg.run_dir / stage.name):  # e.g. a full disk: which stage's folder
            func(all_args[stage.name], executor=executor.for_stage(stage.name))
        stage_dir = cfg.run_dir / stage.name
        logger.info(
            "[%d/%d] %s: done in %.1f s%s", i, len(stages), stage.name, time.time() - t0, _count_note(stage_dir)
        )
        why = input_status(stage_dir)
        if why is None:
            continue
        partial[stage.name] = why
        if not cfg.allow_partial and stage is not stages[-1]:
            logger.error(
                "run %s: stopped after %s: %s. Rerun the same command to retry them, or set `allow_partial: true` "
                "(or --allow_partial) to go on with the rows there are.",
                cfg.name,
                stage.name,
                why,
            )
            _record_partial(cfg.run_dir, partial, allowed=False, executor=executor.describe())
            return EXIT_PARTIAL
        logger.warning("run %s: %s is partial (%s); going on (allow_partial)", cfg.name, stage.name, why)
    _record_partial(cfg.run_dir, partial, allowed=cfg.allow_partial, executor=executor.describe())
    report = " ; report: " + str(cfg.run_dir / "report.html") if any(s.name == "report" for s in stages) else ""
    state = "finished with partial stages " + ", ".join(partial) if partial else "finished"
    logger.info("run %s: %s in %.1f s%s", cfg.name, state, time.time() - started, report)
    return EXIT_PARTIAL if partial else EXIT_OK


def _record_partial(run_dir: Path, partial: Mapping[str, str], allowed: bool, executor: Mapping[str, Any]) -> None:
    """``run.json``: which stages were partial, whether the run went on anyway (the report shows it),
    and where the parallel work ran."""
    write_json(run_dir / "run.json", {"partial_stages": dict(partial), "allow_partial": allowed, **executor})


def _require_upstream(first: Stage, run_dir: Path, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """With --from/--only, the stages before must have finished: their output is our input
    (stages that are off, ``skip``, write nothing)."""
    for stage in STAGES[: STAGE_NAMES.index(first.name)]:
        if stage.name != "report" and stage.name not in skip and not (run_dir / stage.name / MANIFEST).exists():
            raise LmmixupError(
                f"stage {first.name} needs the output of {stage.name} ({run_dir / stage.name} has no {MANIFEST}); "
                f"run without --from/--only first"
            )


def _count_note(stage_dir: Path) -> str:
    try:
        import json

        counts = json.loads((stage_dir / MANIFEST).read_text()).get("counts", {})
    except (OSError, ValueError):
        return ""
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, (int, float)))
    return f" ({shown})" if shown else ""


def _resolved(cfg: RunConfig, all_args: Mapping[str, Any]) -> dict[str, Any]:
    """The effective config, written next to the outputs (secret-looking keys dropped)."""
    from lmmixup_hf.pipeline.workflow import redact

    top = {k: v for k, v in asdict(cfg).items() if k != "sections" and v is not None}
    return {**top, **{name: redact(asdict(a)) for name, a in all_args.items()}}
