"""Typed options: every choice and range is declared on its field and checked wherever the options
come from (flags, a run config, Python); a typo fails before any stage runs; the fingerprint
follows the marks on the fields.

The stages, their options and their choice fields are found by introspection, so a new stage or
option is covered by these tests without editing them."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from pathlib import Path

import pytest
import yaml

from lmmixup_hf.cli import COMMANDS, main
from lmmixup_hf.options import (
    FINGERPRINT,
    RANGE,
    OptionError,
    Range,
    choices,
    fingerprint_params,
    hints,
    literal_fields,
    operational,
)
from lmmixup_hf.pipeline.options import OptionsParser
from lmmixup_hf.pipeline.registry import STAGES
from lmmixup_hf.pipeline.workflow import LOCATION_KEYS, StageRun

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_pool.jsonl"


def args_class(stage) -> type:
    return getattr(importlib.import_module(stage.module), stage.args)


def command_of(stage) -> str:
    """The command that parses a stage's options on its own (rerate is `lmmixup rate`)."""
    return next(name for name, c in COMMANDS.items() if (c.module, c.args) == (stage.module, stage.args))


OWN_COMMANDS = {command_of(s): args_class(s) for s in STAGES}  # one per options class
LITERALS = [(s.name, key, allowed) for s in STAGES for key, allowed in literal_fields(args_class(s)).items()]


def required(cls: type) -> list[str]:
    return [
        f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING is f.default_factory and f.init
    ]


def misspelt(allowed: tuple) -> str:
    return f"{allowed[-1]}x"  # one letter off a valid value: the message suggests it


def run_config(tmp_path: Path, **sections) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["input"] = str(SAMPLE)
    for name, section in sections.items():
        cfg[name] = {**(cfg.get(name) or {}), **section}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(capsys, *argv: str) -> tuple[int, str]:
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def test_every_stage_has_choice_fields_to_test():
    assert {"rate", "cluster", "distill", "longtail"} <= {stage for stage, _, _ in LITERALS}
    assert ("rate", "mode", ("sync", "batch")) in LITERALS


# -- a wrong choice fails first, in a run config and on the stage's own command ----------------------
@pytest.mark.parametrize(("section", "key", "allowed"), LITERALS, ids=[f"{s}.{k}" for s, k, _ in LITERALS])
def test_a_wrong_choice_in_a_run_config_fails_before_any_stage(tmp_path, capsys, section, key, allowed):
    config = run_config(tmp_path, **{section: {key: misspelt(allowed)}})
    status, err = cli(capsys, "run", "--config", config, "--out_dir", tmp_path / "run")
    assert status == 2, err
    assert f"{config}: {section}.{key} '{misspelt(allowed)}': expected one of {', '.join(allowed)}" in err
    assert f"(did you mean '{allowed[-1]}'?)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # no stage folder, nothing ran


@pytest.mark.parametrize(
    ("command", "key", "allowed"),
    [(command, key, allowed) for command, cls in OWN_COMMANDS.items() for key, allowed in literal_fields(cls).items()],
)
def test_a_wrong_choice_flag_fails_before_the_stage(tmp_path, capsys, command, key, allowed):
    cls = OWN_COMMANDS[command]
    argv = [x for name in required(cls) for x in (f"--{name}", tmp_path / name)]
    status, err = cli(capsys, command, *argv, f"--{key}", misspelt(allowed))
    assert status == 2, err
    assert f"--{key} '{misspelt(allowed)}': expected one of {', '.join(allowed)}" in err
    assert f"(did you mean '{allowed[-1]}'?)" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output folder


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("rate", {"engine": "local", "mode": "batch"}, "rate.mode 'batch': needs engine openai"),
        ("cluster", {"sim_floor": 0.3}, "cluster.sim_floor 0.3: applies to sizes drawn only"),
        ("cluster", {"min_size": 7, "max_size": 6}, "cluster.min_size 7: is larger than max_size 6"),
        ("mix", {"ratio": 1.5}, "mix.ratio 1.5: expected a value in [0, 1]"),
        (
            "rate",
            {"rubric": "reference", "reference_field": "x"},
            "rate.reference_field 'x': not with rubric reference",
        ),
    ],
)
def test_combinations_and_ranges_fail_before_any_stage(tmp_path, capsys, section, values, message):
    status, err = cli(
        capsys, "run", "--config", run_config(tmp_path, **{section: values}), "--out_dir", tmp_path / "r"
    )
    assert status == 2 and message in err, err
    assert not (tmp_path / "r").exists()
    cls = OWN_COMMANDS[section]
    flags = [x for k, v in values.items() for x in (f"--{k}", v)]
    status, err = cli(capsys, section, *[x for n in required(cls) for x in (f"--{n}", tmp_path / n)], *flags)
    assert status == 2 and message.replace(f"{section}.", "--") in err, err


def test_ray_section_and_run_flags_are_checked_the_same_way(tmp_path, capsys):
    config = run_config(tmp_path)
    text = config.read_text() + "executor: ray\nray: {distill: {num_gpu: 1}}\n"
    config.write_text(text)
    status, err = cli(capsys, "run", "--config", config, "--out_dir", tmp_path / "r")
    assert status == 2 and "ray.distill.num_gpu: unknown option (did you mean 'num_gpus'?)" in err, err
    config.write_text(text.replace("num_gpu:", "num_gpus:").replace("executor: ray", "executor: rey"))
    status, err = cli(capsys, "run", "--config", config, "--out_dir", tmp_path / "r")
    assert status == 2 and "executor 'rey': expected one of local, ray (did you mean 'ray'?)" in err, err
    status, err = cli(capsys, "run", "--config", run_config(tmp_path), "--to", "distil")
    assert status == 2 and "--to_stage 'distil': expected one of ingest, rate" in err and "'distill'" in err, err
    assert not (tmp_path / "r").exists()


# -- flags and YAML: one parser, equal objects, the same refusals ------------------------------------
def other_value(cls: type, f: dataclasses.Field):
    """A valid value other than the default, chosen from the field's declaration; None: skip it."""
    tp, default = hints(cls)[f.name], f.default
    allowed = choices(tp)
    if allowed is not None:
        return next(c for c in allowed if c != default)
    bound = Range.parse(f.metadata[RANGE]) if RANGE in f.metadata else None
    if tp in (bool, bool | None):
        return not default
    numeric = [t for t in (int, float) if tp in (t, t | None)]
    if numeric:
        lo = bound.low if bound and not math.isinf(bound.low) else 0.0
        hi = bound.high if bound and not math.isinf(bound.high) else None
        base = default if isinstance(default, (int, float)) else lo + (1 if bound and bound.low_open else 0)
        if numeric[0] is int:
            value = base + 1 if default is not None and (hi is None or base + 1 <= hi) else base
            return int(value if value != default else base - 1)
        if default is None:
            return (lo + hi) / 2 if hi is not None else lo + 1.5
        return (default + hi) / 2 if hi is not None and default != hi else (lo + default) / 2 if hi else default + 1.5
    if tp in (str, str | None):
        return TEXT_VALUES.get(f.name, f"other-{f.name}")
    return None


# free-text options whose value is checked all the same
TEXT_VALUES = {"task_type": "mcq"}


def as_flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


# a base the other values can all be combined with: sim_floor needs drawn sizes, batch mode openai
BASE = {"ClusterArgs": {"sizes": "drawn"}, "RateArgs": {"engine": "openai"}}


def changed_values(cls: type) -> dict:
    values = {n: f"path-{n}" for n in required(cls)}
    for f in dataclasses.fields(cls):
        if f.init and f.name not in values and (v := other_value(cls, f)) is not None:
            values[f.name] = v
    return {**values, **BASE.get(cls.__name__, {})}


@pytest.mark.parametrize("command", sorted(OWN_COMMANDS))
def test_flags_and_yaml_build_equal_objects(tmp_path, command):
    cls = OWN_COMMANDS[command]
    values = changed_values(cls)
    parser = OptionsParser(cls, prog=f"lmmixup {command}")
    from_flags = parser.parse_flags(as_flags(values))
    from_yaml = parser.parse_dict(values)
    assert from_flags == from_yaml == cls(**values)
    defaults = {f.name: getattr(cls(**{n: "p" for n in required(cls)}), f.name) for f in dataclasses.fields(cls)}
    fixed = {*required(cls), *BASE.get(cls.__name__, {})}
    assert all(getattr(from_flags, k) != defaults[k] for k in values if k not in fixed), "every value changed"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))  # a command's own --config: the same object again
    assert (
        OptionsParser(cls, prog=f"lmmixup {command}").parse_flags(["--config", str(tmp_path / "c.yaml")]) == from_yaml
    )


@pytest.mark.parametrize("command", sorted(OWN_COMMANDS))
def test_flags_and_yaml_refuse_the_same_inputs(command):
    cls = OWN_COMMANDS[command]
    base = {n: f"path-{n}" for n in required(cls)}
    bad = {key: misspelt(allowed) for key, allowed in literal_fields(cls).items()}
    for f in dataclasses.fields(cls):
        if RANGE in f.metadata:
            low = Range.parse(f.metadata[RANGE]).low
            bad[f.name] = int(low) - 1 if hints(cls)[f.name] in (int, int | None) else low - 0.5
    for key, value in bad.items():
        parser = OptionsParser(cls, prog=f"lmmixup {command}")
        with pytest.raises(OptionError) as by_flag:
            parser.parse_flags(as_flags({**base, key: value}))
        with pytest.raises(OptionError) as by_yaml:
            OptionsParser(cls).parse_dict({**base, key: value}, "x.yaml: s.")
        assert by_flag.value.key == f"--{key}" and by_yaml.value.key == f"x.yaml: s.{key}"
        assert (by_flag.value.detail, by_flag.value.value) == (by_yaml.value.detail, by_yaml.value.value)
    with pytest.raises(OptionError, match="unknown option"):
        OptionsParser(cls).parse_dict({**base, "no_such_option": 1})
    with pytest.raises(Exception, match="unrecognized arguments: --no_such_option"):
        OptionsParser(cls, prog="x").parse_flags(as_flags({**base, "no_such_option": 1}))


def test_yaml_types_are_checked_and_ints_are_floats():
    from lmmixup_hf.pipeline.mix import MixArgs

    base = {"original": "o", "distilled": "d", "out": "x"}
    with pytest.raises(OptionError, match=r"s\.total: expected int, got str 'ten'"):
        OptionsParser(MixArgs).parse_dict({**base, "total": "ten"}, "s.")
    a, b = (
        OptionsParser(MixArgs).parse_dict({**base, "ratio": 1}),
        OptionsParser(MixArgs).parse_flags(as_flags({**base, "ratio": 1.0})),
    )
    assert a == b and isinstance(a.ratio, float) and fingerprint_params(a) == fingerprint_params(b)


def test_core_options_are_typed_and_name_the_option():
    import numpy as np
    from datasets import Dataset

    from lmmixup_hf.options import resolve
    from lmmixup_hf.stages.cluster import ClusterOptions, cluster_rows
    from lmmixup_hf.stages.distill import GenerationOptions

    ds = Dataset.from_dict({"id": ["a", "b"], "source": ["s", "s"], "prompt": ["p", "q"], "completion": ["x", "y"]})
    x = np.eye(2, 4, dtype=np.float32)
    for bad, message in [({"sizes": "drawnn"}, "sizes 'drawnn'"), ({"max_sise": 3}, "max_sise: unknown option")]:
        with pytest.raises(ValueError, match=message):
            cluster_rows(ds, x, **bad)
    with pytest.raises(ValueError, match=r"sim_floor 0.5: applies to sizes drawn only"):
        ClusterOptions(sim_floor=0.5)
    assert resolve(GenerationOptions, None, {"top_p": 0.5}) == GenerationOptions(top_p=0.5)
    with pytest.raises(ValueError, match=r"top_p 0: expected a value in \(0, 1\]"):
        GenerationOptions(top_p=0)
    assert GenerationOptions(task_type="para_mixup").task_type == "para_mixup"  # aliases are task types
    with pytest.raises(ValueError, match=r"task_type 'qaa': expected one of qa, .*\(did you mean 'qa'\?\)"):
        GenerationOptions(task_type="qaa")


def test_defaults_are_written_once():
    """The stage commands extend the cores' options classes instead of repeating their defaults."""
    from lmmixup_hf.pipeline.cluster import ClusterArgs
    from lmmixup_hf.pipeline.distill import DistillArgs
    from lmmixup_hf.pipeline.longtail import LongtailArgs
    from lmmixup_hf.pipeline.mix import MixArgs
    from lmmixup_hf.stages import cluster
    from lmmixup_hf.stages.distill import GenerationOptions
    from lmmixup_hf.stages.longtail import LongtailOptions
    from lmmixup_hf.stages.mix import MixOptions

    for args, core in [
        (ClusterArgs, cluster.ClusterOptions),
        (DistillArgs, GenerationOptions),
        (LongtailArgs, LongtailOptions),
        (MixArgs, MixOptions),
    ]:
        assert issubclass(args, core)
        own = {f.name for f in dataclasses.fields(args)} - {f.name for f in dataclasses.fields(core)}
        assert all(f.name in own or f in dataclasses.fields(core) for f in dataclasses.fields(args)), args
    assert not hasattr(cluster, "CLUSTER_DEFAULTS")
    source = (ROOT / "lmmixup_hf" / "pipeline" / "options.py").read_text()
    assert "BOUNDS" not in source
    assert "SimpleNamespace" not in (ROOT / "lmmixup_hf" / "stages" / "cluster.py").read_text()


# -- one fingerprint policy, read from the marks -----------------------------------------------------
def finished(tmp_path: Path, stage, args) -> Path:
    out = tmp_path / stage.name
    StageRun(stage.name, out, params=args).finish(None)
    return out


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_operational_options_never_rerun_a_stage_and_the_others_do(tmp_path, stage):
    cls = args_class(stage)
    base = cls(**{n: f"path-{n}" for n in required(cls)}, **BASE.get(cls.__name__, {}))
    out = finished(tmp_path, stage, base)
    assert StageRun(stage.name, out, params=base).is_complete()
    ops = set(operational(cls))
    for f in dataclasses.fields(cls):
        value = other_value(cls, f)
        value = f.default if value == getattr(base, f.name) else value  # a field the base already changed
        if f.name in LOCATION_KEYS or value is None:
            continue  # paths: the inputs are fingerprinted by content instead
        changed = dataclasses.replace(base, **{f.name: value})
        up_to_date = StageRun(stage.name, out, params=changed).is_complete()
        assert up_to_date == (f.name in ops), f"{stage.name}.{f.name} = {value!r}"


def test_the_marks_keep_the_fingerprints_finished_runs_had(tmp_path):
    """rate and distill left the same options out before the marks existed (a tuple, pops): the
    fingerprint is the one the old code computed, so their finished runs stay up to date."""
    from lmmixup_hf.distiller.prompts import PROMPT_VERSION
    from lmmixup_hf.judge.judges import RUBRIC_VERSION
    from lmmixup_hf.pipeline.distill import DistillArgs
    from lmmixup_hf.pipeline.rate import RateArgs

    old_rate_operational = (
        "base_url", "max_concurrency", "rpm", "tpm", "max_retries", "timeout", "retry_base_delay", "cache_dir",
        "prices", "batch_size", "progress", "mode", "batch_file_only", "batch_results", "batch_poll_interval",
        "estimate",
    )  # fmt: skip
    rate = RateArgs(input="i", out="o", judge_model="j", temperature=0.5, api_key="sk-x", batch_size=3)
    later = ("scores_from", "score_scale")  # options the old code did not have (hashed only when set)
    old = {k: v for k, v in dataclasses.asdict(rate).items() if k not in old_rate_operational + later}
    new = StageRun("rate", tmp_path / "a", params=rate, tags={"rubric_version": RUBRIC_VERSION})
    assert (
        new.fingerprint
        == StageRun("rate", tmp_path / "b", params={**old, "rubric_version": RUBRIC_VERSION}).fingerprint
    )

    for style in ("ours", "reference"):
        d = DistillArgs(input="i", out="o", model="m", max_new_tokens=9, prompt_style=style, device="cpu")
        old = dataclasses.asdict(d)
        for k in (
            "out",
            "checkpoint_every",
            "max_concurrency",
            "max_retries",
            "retry_base_delay",
            "cache_dir",
            "device",
            "batch_size",
        ):
            old.pop(k)
        if old["prompt_style"] == "ours":
            old.pop("prompt_style")
        new = StageRun("distill", tmp_path / "c", params=d, tags={"prompt_version": PROMPT_VERSION})
        assert (
            new.fingerprint
            == StageRun("distill", tmp_path / "d", params={**old, "prompt_version": PROMPT_VERSION}).fingerprint
        )
        assert new.params["device"] == "cpu" and "api_key" not in new.params  # recorded, secrets never


def test_the_docs_list_the_operational_options():
    doc = (ROOT / "docs" / "pipeline.md").read_text()
    expected = [f"| {c} | {', '.join(f'`{n}`' for n in operational(cls)) or '-'} |" for c, cls in OWN_COMMANDS.items()]
    missing = [line for line in expected if line not in doc]
    assert not missing, "docs/pipeline.md should list:\n" + "\n".join(expected)
    assert all(f.metadata.get(FINGERPRINT, True) in (True, False, "non-default") for cls in OWN_COMMANDS.values()
               for f in dataclasses.fields(cls))  # fmt: skip


def test_an_operational_change_leaves_a_finished_cluster_stage_up_to_date(tmp_path):
    """End to end: the cluster stage reruns for a clustering option, not for the embedding batch size."""
    from test_clustering import _embedded_pool

    from lmmixup_hf.pipeline.cluster import ClusterArgs, cluster

    _embedded_pool(tmp_path / "pool.jsonl", n=24)
    args = ClusterArgs(input=str(tmp_path / "pool.jsonl"), out=str(tmp_path / "c"), quality="all", max_size=5)
    cluster(args)
    first = (tmp_path / "c" / "manifest.json").stat().st_mtime_ns
    cluster(dataclasses.replace(args, batch_size=7, device="cpu"))
    assert (tmp_path / "c" / "manifest.json").stat().st_mtime_ns == first
    cluster(dataclasses.replace(args, max_size=4))
    assert (tmp_path / "c" / "manifest.json").stat().st_mtime_ns != first
    assert re.search(r'"max_size": 4', (tmp_path / "c" / "manifest.json").read_text())
