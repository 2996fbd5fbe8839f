"""MIXTURE builder, registration, reference split and parquet export, on the fixture mirror."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from huggingface_hub import DatasetCard

import lmmixup_hf  # noqa: F401  (registers load_dataset("mixture"))
from lmmixup_hf import cli
from lmmixup_hf.data.schema import TASK_TYPES, LmmixupError, make_id
from lmmixup_hf.distiller.prompts import linearize_cluster
from lmmixup_hf.integrations import mixture
from lmmixup_hf.integrations.mixture import (
    CONFIG_NAMES,
    FEATURES,
    STAGE_SPLITS,
    Mixture,
    MixtureFormatError,
    MixtureUnavailableError,
    parse_members,
    split_sft_grpo,
)
from lmmixup_hf.integrations.mixture_export import render_card

REPO_ROOT = Path(__file__).resolve().parents[1]
MIRROR = REPO_ROOT / "tests" / "fixtures" / "mixture"


def _raw(rel: str) -> list[dict]:
    return json.loads((MIRROR / rel).read_text(encoding="utf-8"))


def _expected_counts(name: str) -> dict[str, int]:
    """Split sizes computed from the fixture files with the reference formulas (not the builder)."""
    scope, _, stage = name.partition("-")
    stage = stage or "raw"
    tasks = TASK_TYPES if scope == "all" else (scope,)
    counts: Counter = Counter()
    for t in tasks:
        n_train = len(_raw(mixture.sft_file(t, "train")))
        n_test = len(_raw(mixture.sft_file(t, "test")))
        n_sft = int(0.3 * n_train)
        n_val = max(1, int(0.1 * (n_train - n_sft)))
        counts["test"] += n_test
        if stage == "raw":
            counts["train"] += n_train
            for split, rel in mixture.GRPO_FILES.items():
                counts[f"grpo_{split}"] += sum(r["task_type"] == f"{t}_mixup" for r in _raw(rel))
        elif stage == "sft":
            counts["train"] += n_sft
        else:
            counts["train"] += n_train - n_sft - n_val
            counts["validation"] += n_val
    return dict(counts)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


def _load(name: str, cache: str, **kw):
    return load_dataset("mixture", name, data_dir=str(MIRROR), cache_dir=cache, **kw)


# -- every config ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_loads_with_features_and_counts(name, cache):
    dsd = _load(name, cache)
    stage = name.partition("-")[2] or "raw"
    assert list(dsd) == list(STAGE_SPLITS[stage])
    assert {s: len(ds) for s, ds in dsd.items()} == _expected_counts(name)
    scope = name.partition("-")[0]
    for ds in dsd.values():
        assert ds.features == FEATURES
        assert set(ds["task_type"]) <= (set(TASK_TYPES) if scope == "all" else {scope})
        assert all(m and all(x.startswith("Q:") for x in m) for m in ds["members"])
        assert all(o.strip() for o in ds["output"])
    if stage == "grpo":  # instruction merged into the input, as the reference GRPO files
        for row in dsd["train"]:
            assert row["instruction"] == "" and row["input"].startswith("Merge the related")


def test_all_is_the_task_configs_in_order(cache):
    for stage in ("raw", "sft", "grpo"):
        whole = _load(mixture.config_name("all", stage), cache)
        parts = [_load(mixture.config_name(t, stage), cache) for t in TASK_TYPES]
        for split in whole:
            assert whole[split]["id"] == [i for p in parts for i in p[split]["id"]]


# -- field mapping -----------------------------------------------------------------------------
def test_field_mapping_onto_the_data_contract(cache):
    raw = _load("all", cache)
    by_task = {t: raw["train"].filter(lambda r, t=t: r["task_type"] == t) for t in TASK_TYPES}

    mcq_file = _raw(mixture.sft_file("mcq", "train"))
    assert by_task["mcq"]["id"] == [str(r["id"]) for r in mcq_file]  # integer ids become strings
    tfq_file = _raw(mixture.sft_file("tfq", "train"))
    assert by_task["tfq"]["id"] == [make_id(r["input"], r["output"]) for r in tfq_file]  # no id: stable hash
    assert set(by_task["para"]["source"]) == {"para"} and set(by_task["qa"]["source"]) == {"wikipedia"}
    assert by_task["tfq"]["cot"][2] == ""

    cs_test = raw["test"].filter(lambda r: r["task_type"] == "cs")
    assert [r["cot"] for r in _raw(mixture.sft_file("cs", "test"))][1] is None
    assert cs_test["cot"][1] == ""  # null cot -> ""

    # the published GRPO files: `<task>_mixup` loses its suffix, the merged instruction is not a member
    published = _raw(mixture.GRPO_FILES["train"])
    assert set(raw["grpo_train"]["task_type"]) == {r["task_type"].removesuffix("_mixup") for r in published}
    row = raw["grpo_train"][0]
    assert row["instruction"] == "" and not row["members"][0].startswith("Merge")

    # members rebuild the input (and survive a blank line inside an answer)
    for r in raw["train"]:
        assert linearize_cluster(r["members"]) == r["input"]
    qa4 = by_task["qa"][4]
    assert len(qa4["members"]) == 3 and "\n\nthe gatehouse is still there" in qa4["members"][0]


def test_parse_members():
    assert parse_members("Do this.\n\nQ: a\nA: b\n\nQ: c\r\nA: d") == ["Q: a\nA: b", "Q: c\nA: d"]
    assert parse_members("Q: a\nA: line 1\n\nline 2\n\n\nQ: c\nA: d") == ["Q: a\nA: line 1\n\nline 2", "Q: c\nA: d"]
    assert parse_members("first note\n\n  \nsecond note") == ["first note", "second note"]
    assert parse_members("") == []


# -- direct use and streaming ------------------------------------------------------------------
def test_builder_works_directly(cache, tmp_path):
    builder = Mixture(config_name="qa-sft", data_dir=str(MIRROR), cache_dir=str(tmp_path))
    builder.download_and_prepare()
    direct = builder.as_dataset()
    via_load = _load("qa-sft", cache)
    for split in via_load:
        assert direct[split].to_list() == via_load[split].to_list()


@pytest.mark.parametrize("name", ["all-grpo", "mcq", "cs-sft"])
def test_streaming_matches_the_prepared_dataset(name, cache):
    streamed = _load(name, cache, streaming=True)
    prepared = _load(name, cache)
    assert set(streamed) == set(prepared)
    for split in prepared:
        assert list(streamed[split]) == prepared[split].to_list()


# -- the reference split -----------------------------------------------------------------------
def test_split_is_reproducible_and_a_partition():
    records = [f"r{i}" for i in range(57)]
    a, b = split_sft_grpo(records, seed=42), split_sft_grpo(records, seed=42)
    assert a == b
    assert a.sft == records[: int(0.3 * 57)]  # the head, in file order
    assert sorted(a.sft + a.grpo_train + a.grpo_test) == sorted(records)
    assert len(a.grpo_test) == max(1, int(0.1 * (57 - len(a.sft))))
    assert split_sft_grpo(records, seed=7).grpo_train != a.grpo_train
    assert sorted(split_sft_grpo(records, seed=7).grpo_train + split_sft_grpo(records, seed=7).grpo_test) == sorted(
        a.grpo_train + a.grpo_test
    )
    # the qa numbers printed by the reference split notebook
    qa = split_sft_grpo(range(31_108))
    assert (len(qa.sft), len(qa.grpo_train), len(qa.grpo_test)) == (9_332, 19_599, 2_177)
    assert split_sft_grpo([]) == mixture.MixtureSplit([], [], [])


def test_grpo_stage_reproduces_the_published_grpo_files(cache, tmp_path):
    derived = _load("all-grpo", cache)
    published = {s: _raw(rel) for s, rel in mixture.GRPO_FILES.items()}
    key = lambda r: (r["input"], r["output"], r["task_type"].removesuffix("_mixup"))  # noqa: E731
    assert Counter(map(key, derived["train"])) == Counter(map(key, published["train"]))
    assert Counter(map(key, derived["validation"])) == Counter(map(key, published["test"]))
    # same seed, fresh cache: same rows in the same order; another seed: another order
    again = load_dataset("mixture", "all-grpo", data_dir=str(MIRROR), cache_dir=str(tmp_path / "again"))
    assert again["train"]["id"] == derived["train"]["id"]
    other = load_dataset("mixture", "qa-grpo", data_dir=str(MIRROR), cache_dir=str(tmp_path / "s7"), seed=7)
    base = _load("qa-grpo", cache)
    assert other["train"]["id"] != base["train"]["id"]
    assert sorted([*other["train"]["id"], *other["validation"]["id"]]) == sorted(
        [*base["train"]["id"], *base["validation"]["id"]]
    )


# -- errors ------------------------------------------------------------------------------------
def _broken_mirror(tmp_path: Path, rel: str, index: int | None, value) -> Path:
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR, mirror)
    path = mirror / rel
    if index is None:
        path.write_text(value, encoding="utf-8")
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
        rows[index] = value(rows[index])
        path.write_text(json.dumps(rows), encoding="utf-8")
    return mirror


def _cause(exc: BaseException) -> BaseException:
    return exc.__cause__ if isinstance(exc, DatasetGenerationError) and exc.__cause__ else exc


_QA_TRAIN, _QA_TEST = mixture.sft_file("qa", "train"), mixture.sft_file("qa", "test")
_MCQ_TRAIN, _GRPO_TRAIN = mixture.sft_file("mcq", "train"), mixture.GRPO_FILES["train"]


@pytest.mark.parametrize(
    "rel, index, value, field, reason",
    [
        (_MCQ_TRAIN, 3, lambda r: {**r, "output": 5}, "output", "expected a string"),
        (_QA_TEST, 2, lambda r: {k: v for k, v in r.items() if k != "input"}, "input", "missing"),
        (_QA_TRAIN, 7, lambda r: ["not", "an", "object"], None, "expected a JSON object"),
        (_GRPO_TRAIN, 5, lambda r: {**r, "task_type": "essay_mixup"}, "task_type", "unknown task type"),
        (_GRPO_TRAIN, 0, lambda r: {k: v for k, v in r.items() if k != "task_type"}, "task_type", "missing"),
        (_QA_TRAIN, 1, lambda r: {**r, "id": [1]}, "id", "expected a string or an integer"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_malformed_row_names_file_index_and_field(tmp_path, rel, index, value, field, reason, streaming):
    mirror = _broken_mirror(tmp_path, rel, index, value)
    config = "all" if rel.startswith("data_grpo") else rel.split("/")[1]
    with pytest.raises(Exception) as info:
        dsd = load_dataset("mixture", config, data_dir=str(mirror), cache_dir=str(tmp_path / "c"), streaming=streaming)
        if streaming:
            for ds in dsd.values():
                list(ds)
    err = _cause(info.value)
    assert isinstance(err, MixtureFormatError), repr(info.value)
    assert (err.file, err.index, err.field) == (str(mirror / rel), index, field)
    assert str(mirror / rel) in str(err) and f"row {index}" in str(err) and reason in str(err)


def test_invalid_json_names_file_line_and_column(tmp_path):
    mirror = _broken_mirror(tmp_path, "data_sft/tfq/merged_test_tfq_noisy.json", None, '[\n  {"input": "Q: x"\n')
    with pytest.raises(DatasetGenerationError) as info:
        load_dataset("mixture", "tfq-sft", data_dir=str(mirror), cache_dir=str(tmp_path / "c"))
    err = _cause(info.value)
    assert isinstance(err, MixtureFormatError) and "merged_test_tfq_noisy.json" in str(err) and "line 3" in str(err)


def test_missing_file_in_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR, mirror)
    shutil.rmtree(mirror / "data_grpo")
    with pytest.raises(MixtureUnavailableError, match="data_grpo/llm_mixup/train.json: missing"):
        load_dataset("mixture", "qa", data_dir=str(mirror), cache_dir=str(tmp_path / "c"))
    # the sft stage does not need the GRPO files
    assert len(load_dataset("mixture", "qa-sft", data_dir=str(mirror), cache_dir=str(tmp_path / "c"))["train"]) == 6


def test_edited_mirror_is_rebuilt_not_served_from_cache(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR, mirror)
    first = load_dataset("mixture", "cs", data_dir=str(mirror), cache_dir=str(tmp_path / "c"))
    path = mirror / mixture.sft_file("cs", "test")
    rows = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(rows[:1]), encoding="utf-8")
    os.utime(path, (1e9, 1e9))
    second = load_dataset("mixture", "cs", data_dir=str(mirror), cache_dir=str(tmp_path / "c"))
    assert (len(first["test"]), len(second["test"])) == (2, 1)


@pytest.mark.parametrize("decoy", [False, True])
def test_without_data_dir_it_reads_the_hub_never_the_cwd(tmp_path, monkeypatch, decoy):
    monkeypatch.chdir(tmp_path)
    if decoy:  # a data file in the CWD must not be picked up
        (tmp_path / "train.json").write_text(json.dumps([{"input": "Q: x\nA: y", "output": "z"}]))
    with pytest.raises(MixtureUnavailableError, match=r"dokiik/MIXTURE.*data_dir="):
        load_dataset("mixture", "qa", cache_dir=str(tmp_path / "c"))  # tests run with HF_HUB_OFFLINE=1


def test_data_files_are_refused_not_ignored(tmp_path):
    with pytest.raises(LmmixupError, match="pass data_dir="):
        load_dataset("mixture", "qa", data_files=str(MIRROR / _QA_TRAIN), cache_dir=str(tmp_path))


# -- registration ------------------------------------------------------------------------------
def test_import_registers_the_builder():
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    assert _PACKAGED_DATASETS_MODULES["mixture"][0] == "lmmixup_hf.integrations.mixture"
    assert datasets.get_dataset_config_names("mixture", data_dir=str(MIRROR)) == list(CONFIG_NAMES)


def test_register_is_version_guarded(monkeypatch, tmp_path):
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    monkeypatch.setattr(datasets, "__version__", "99.0.0")
    assert mixture.register("mixture-guarded") is False
    assert "mixture-guarded" not in _PACKAGED_DATASETS_MODULES
    monkeypatch.undo()
    try:
        assert mixture.register("mixture-guarded") is True
        ds = load_dataset("mixture-guarded", "para-sft", data_dir=str(MIRROR), cache_dir=str(tmp_path))
        assert len(ds["train"]) == 3
    finally:
        mixture.unregister("mixture-guarded")
    assert "mixture-guarded" not in _PACKAGED_DATASETS_MODULES


# -- export ------------------------------------------------------------------------------------
def _lmmixup(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lmmixup")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _flat(flags: dict) -> list[str]:
    return [str(x) for kv in flags.items() for x in kv]


def test_export_round_trip(tmp_path, cache):
    out = tmp_path / "mixture-parquet"
    flags = {"--to": "parquet", "--out": out, "--data-dir": MIRROR, "--dataset-id": "org/mixture"}
    assert cli.main(["mixture", "export", *_flat(flags), "--cache_dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data"]
    assert not list(tmp_path.glob(".*tmp-*"))

    card = DatasetCard.load(out / "README.md")
    assert {c["config_name"] for c in card.data.configs} == set(CONFIG_NAMES)
    assert card.data.license == "unknown" and "org/mixture" in card.text and "| `qa-sft` | 6 |" in card.text

    # the parquet form loads with the plain folder loader and equals the builder's output
    assert datasets.get_dataset_config_names(str(out)) == list(CONFIG_NAMES)
    for name in CONFIG_NAMES:
        exported = load_dataset(str(out), name, cache_dir=str(tmp_path / "p"))
        built = _load(name, cache)
        assert list(exported) == list(built)
        for split in built:
            assert exported[split].features == FEATURES
            assert exported[split].to_list() == built[split].to_list()


@pytest.mark.slow
def test_console_script_export_loads_without_the_package(tmp_path):
    out = tmp_path / "mixture-parquet"
    flags = {"--to": "parquet", "--out": out, "--data-dir": MIRROR, "--stages": "sft", "--cache_dir": tmp_path}
    res = _lmmixup("mixture", "export", *_flat(flags), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    code = (
        "import sys; from datasets import load_dataset; "
        f"d = load_dataset({str(out)!r}, 'all-sft', cache_dir={str(tmp_path / 'q')!r}); "
        "assert 'lmmixup_hf' not in sys.modules; print(len(d['train']), len(d['test']))"
    )
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    expected = _expected_counts("all-sft")
    assert plain.stdout.split() == [str(expected["train"]), str(expected["test"])]


def test_export_refuses_a_non_empty_folder_unless_asked(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["mixture", "export", "--out", str(out), "--data-dir", str(MIRROR), "--tasks", "tfq", "--stages", "sft"]
    assert cli.main([*args, "--cache_dir", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--cache_dir", str(tmp_path), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data", "notes.txt"]
    assert datasets.get_dataset_config_names(str(out)) == ["tfq-sft", "all-sft"]


def test_export_reports_a_malformed_row_without_traceback(tmp_path, capsys):
    # row 4 is outside the sft portion (the first 3 rows): every row of a file is checked anyway
    mirror = _broken_mirror(tmp_path, "data_sft/cs/merged_train_cs_noisy.json", 4, lambda r: {**r, "output": None})
    flags = {"--out": tmp_path / "out", "--data-dir": mirror, "--tasks": "cs", "--stages": "sft"}
    assert cli.main(["mixture", "export", *_flat(flags), "--cache_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "merged_train_cs_noisy.json, row 4, field 'output': missing" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_shipped_card_is_the_rendered_card():
    shipped = (REPO_ROOT / "dataset_scripts" / "mixture" / "README.md").read_text(encoding="utf-8")
    regenerate = "regenerate it: lmmixup mixture card --out dataset_scripts/mixture/README.md"
    assert shipped.strip() == str(render_card()).strip(), regenerate
    card = DatasetCard(shipped)
    names = [c["config_name"] for c in card.data.configs]
    assert names == [mixture.config_name(s, st) for st in mixture.STAGES for s in mixture.SCOPES]
    assert [c for c in card.data.configs if c.get("default")] == [card.data.configs[5]]
    assert not list((REPO_ROOT / "dataset_scripts" / "mixture").glob("*.py"))  # datasets >= 4 would refuse it
