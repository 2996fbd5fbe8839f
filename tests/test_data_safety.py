"""No row lost on retried runs, honest exit statuses, and one clear line for every bad input.

The fault-injection test fails a third of the judge's requests, reruns `lmmixup rate` until no row
is left failed, and checks that every pool row reaches every later stage (rows in = rows out +
quarantined). The table of bad invocations checks that no user error prints a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from openai_server import Faults, judge_responder, server_factory

from lmmixup_hf.cli import COMMANDS, EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, main

_openai_server = pytest.fixture(server_factory, name="openai_server")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
KEY = "sk-test-data-safety-7f3e"
TOPICS = ("tulips", "volcanoes", "tides", "bread", "comets", "bees", "glaciers", "violins")


def write_pool(path: Path, n: int = 40) -> Path:
    rows = [
        {
            "id": f"p{i:03d}",
            "prompt": f"Tell me one fact about {TOPICS[i % len(TOPICS)]} (variant {i}).",
            "completion": f"A fact about {TOPICS[i % len(TOPICS)]}: it is number {i}.",
            "source": ("dolly", "oasst1")[i % 2],
        }
        for i in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def n_rows(folder: Path, name: str = "data") -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in (folder / name).glob("*.parquet"))


# -- retried rows reach every later stage ---------------------------------------------------------
def test_rate_rerun_until_complete_reaches_split_and_cluster(openai_server, tmp_path, minilm_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("LMMIXUP_CACHE", str(tmp_path / "cache"))
    server = openai_server(judge_responder, faults=Faults(rate_500=0.35, seed=3))
    pool = write_pool(tmp_path / "pool.jsonl")
    rated, split, clusters = tmp_path / "rate", tmp_path / "split", tmp_path / "cluster"
    rate_argv = ["rate", "--input", str(pool), "--out", str(rated), "--judge-model", "stub-judge"]
    rate_argv += ["--base-url", server.base_url, "--max-retries", "0", "--cache-dir", "none", "--progress", "false"]
    split_argv = ["split", "--input", str(rated), "--out", str(split), "--top_share", "0.3"]
    cluster_argv = ["cluster", "--input", str(split / "low"), "--out", str(clusters), "--quality", "all"]
    cluster_argv += ["--embedding_model", "minilm-offline", "--min_size", "2", "--max_size", "4", "--mean_cap", "3"]

    assert main(rate_argv) == EXIT_PARTIAL  # some rows failed: a distinct, documented status
    first = manifest(rated)["counts"]
    assert first["failed"] >= 0.3 * 40 and first["rated"] + first["failed"] == 40 and server.faults_sent["500"]
    assert main(split_argv) == EXIT_PARTIAL  # built on a partial input, and it says so
    assert manifest(split)["counts"]["rows_in"] == first["rated"]
    assert str(rated) in manifest(split)["partial_inputs"]
    assert main(cluster_argv) == EXIT_PARTIAL  # partiality travels down the chain

    for _ in range(20):  # the README's advice: rerun until nothing is left failed
        if main(rate_argv) == EXIT_OK:
            break
    assert manifest(rated)["complete"] and manifest(rated)["counts"]["rated"] == 40
    assert (rated / "failed.jsonl").read_text() == ""

    assert main(split_argv) == EXIT_OK  # its input changed: it reran, over all 40 rows
    s = manifest(split)["counts"]
    assert s["rows_in"] == 40 and s["high"] + s["low"] == 40 and "partial_inputs" not in manifest(split)
    assert n_rows(split / "high") + n_rows(split / "low") == 40
    assert main(cluster_argv) == EXIT_OK
    c = manifest(clusters)["counts"]
    assert c["clustered"] + c["leftovers"] + manifest(clusters)["counts"]["rejected"] == s["low"]

    calls = server.n_requests  # and now everything is up to date: nothing reruns, nothing is asked
    stamps = {p: p.stat().st_mtime_ns for p in (split / "low" / "data").glob("*.parquet")}
    assert [main(rate_argv), main(split_argv), main(cluster_argv)] == [EXIT_OK] * 3
    assert server.n_requests == calls
    assert {p: p.stat().st_mtime_ns for p in (split / "low" / "data").glob("*.parquet")} == stamps


def test_run_stops_on_a_partial_stage_unless_allowed(openai_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = openai_server(judge_responder, faults=Faults(rate_500=0.4, seed=5))
    pool = write_pool(tmp_path / "pool.jsonl", 24)
    cfg = yaml.safe_load(DEMO.read_text())
    cfg.update(input=str(pool), out_dir=str(tmp_path / "run"), name="partial")
    cfg["rate"] = {"engine": "openai", "judge_model": "stub-judge", "base_url": server.base_url}
    cfg["rate"].update(max_retries=0, cache_dir="none", progress=False)
    config = tmp_path / "partial.yaml"
    config.write_text(yaml.safe_dump(cfg))

    assert main(["run", "--config", str(config), "--to", "split"]) == EXIT_PARTIAL
    assert not (tmp_path / "run" / "split").exists()  # stopped before the next stage
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {
        "partial_stages": {"rate": manifest(tmp_path / "run" / "rate")["incomplete"]},
        "allow_partial": False,
        "executor": "local",
    }
    assert main(["run", "--config", str(config), "--to", "split", "--allow_partial", "true"]) == EXIT_PARTIAL
    assert manifest(tmp_path / "run" / "split")["partial_inputs"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["allow_partial"] is True
    assert main(["report", "--run_dir", str(tmp_path / "run")]) == EXIT_OK
    assert "PARTIAL: rate:" in (tmp_path / "run" / "report.md").read_text()


def test_the_partial_line_says_rerun_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pool = write_pool(tmp_path / "pool.jsonl", 2)
    argv = ["rate", "--input", str(pool), "--out", str(tmp_path / "rate"), "--base_url", "http://127.0.0.1:9/v1"]
    assert main([*argv, "--max_retries", "0", "--cache_dir", "none", "--progress", "false"]) == EXIT_PARTIAL
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "partial:" in x]
    assert "2 of 2 rows failed (see failed.jsonl)" in line, line
    assert line.replace(str(tmp_path / "rate"), "").count("rerun") == 1, line


# -- fingerprints follow content, not places ------------------------------------------------------
def test_moving_a_stage_folder_does_not_rerun_it(tmp_path):
    pool = write_pool(tmp_path / "a" / "pool.jsonl")
    assert main(["ingest", "--input", str(pool), "--out", str(tmp_path / "a" / "ingest")]) == EXIT_OK
    shutil.move(tmp_path / "a", tmp_path / "b")
    before = manifest(tmp_path / "b" / "ingest")
    assert (
        main(["ingest", "--input", str(tmp_path / "b" / "pool.jsonl"), "--out", str(tmp_path / "b" / "ingest")]) == 0
    )
    assert manifest(tmp_path / "b" / "ingest")["timing"] == before["timing"]  # skipped, not redone
    write_pool(pool, 39)  # different content at the old place: a different fingerprint
    assert main(["ingest", "--input", str(pool), "--out", str(tmp_path / "b" / "ingest")]) == 0
    assert manifest(tmp_path / "b" / "ingest")["counts"]["rows_out"] == 39


# -- every --help works, no user error prints a traceback -----------------------------------------
def lmmixup(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmmixup_hf.cli", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help(command):
    r = lmmixup(command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, 2]}), d / "no_columns.parquet")
    pq.write_table(pa.table({"prompt": [1, 2], "completion": ["x", "y"]}), d / "int_prompts.parquet")
    vectors = pa.array([[1.0, 0.0], [0.5], [0.0, 1.0]], pa.list_(pa.float32()))
    pq.write_table(
        pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "embedding": vectors}),
        d / "ragged.parquet",
    )
    (d / "array.jsonl").write_text(json.dumps([{"prompt": "p", "completion": "c"}]))
    (d / "ok.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    (d / "bad.yaml").write_text("rate: [unclosed\n")
    (d / "a_file").write_text("x")
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["input"] = str(d / "ok.jsonl")
    for name, section, value in (("ratio", "mix", {"ratio": 7}), ("limit", "distill", {"limit": -3})):
        (d / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, section: {**(cfg.get(section) or {}), **value}}))
    return d


BAD = [
    (("ingest", "--input", "{d}/no_columns.parquet", "--out", "{d}/o1"), 2, "needs a prompt column"),
    (("ingest", "--input", "{d}/int_prompts.parquet", "--out", "{d}/o2"), 2, "all 2 rows are unusable"),
    (("ingest", "--input", "{d}/array.jsonl", "--out", "{d}/o3"), 2, "name it .json"),
    (("ingest", "--input", "{d}/ok.jsonl", "--out", "{d}/o4", "--max_chars", "-5"), 2, "--max_chars -5"),
    (("ingest", "--input", "{d}/ok.jsonl", "--out", "{d}/a_file"), 2, "is not a folder"),
    (("ingest", "--input", "{d}/ok.jsonl", "--out", "/proc/lmmixup/x"), 2, "cannot create the folder"),
    (("ingest", "--config", "{d}/missing.yaml"), 2, "no such file"),
    (("ingest", "--config", "{d}"), 2, "is a folder"),
    (("ingest", "--config", "{d}/bad.yaml"), 2, "not valid YAML"),
    (("split", "--input", "{d}/ok.jsonl", "--out", "{d}/o5", "--top_share", "1.5"), 2, "--top_share 1.5"),
    (
        ("cluster", "--input", "{d}/ragged.parquet", "--out", "{d}/o9", "--quality", "all"),
        2,
        "of length 1; expected 2",
    ),
    (("run", "--config", "{d}/ratio.yaml"), 2, "mix.ratio 7"),
    (("run", "--config", "{d}/limit.yaml"), 2, "distill.limit -3"),
    (("run", "--config", "{d}/bad.yaml"), 2, "not valid YAML"),
    (("push", "--repo_id", "org/x", "--model_dir", "{d}"), 2, "HF_TOKEN"),
    (("pull", "--repo_id", "org/x", "--out", "{d}/o6"), 1, "HF_HUB_OFFLINE"),
    (("rate", "--input", "{d}/ok.jsonl", "--out", "{d}/o7"), 2, "set OPENAI_API_KEY"),
    (
        ("rate", "--input", "{d}/ok.jsonl", "--out", "{d}/o8", "--base_url", "http://127.0.0.1:9/v1")
        + ("--max_retries", "0", "--cache_dir", "none", "--progress", "false"),
        3,
        "1 of 1 rows failed",
    ),
]


@pytest.mark.parametrize(
    ("argv", "status", "message"), BAD, ids=[" ".join(b[0][:1]) + f"-{i}" for i, b in enumerate(BAD)]
)
def test_bad_invocations_fail_in_one_line(bad_inputs, argv, status, message):
    env = {"HF_TOKEN": "", "HF_HUB_OFFLINE": "1", "HF_HOME": str(bad_inputs / "hf-home")}
    env.update(OPENAI_API_KEY="", OPENAI_BASE_URL="")  # an unreachable endpoint: every row fails, exit 3
    r = lmmixup(*(a.format(d=bad_inputs) for a in argv), env=env)
    assert r.returncode == status, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and message in r.stderr, r.stderr[-2000:]


# -- a full disk names the folder it could not write ----------------------------------------------
def test_a_full_disk_names_the_folder(tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    def full_disk(*args, **kwargs):  # what pyarrow raises on a full disk: errno 28, no file name
        raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    pool = write_pool(tmp_path / "pool.jsonl", 8)
    out = tmp_path / "ingest"
    assert main(["ingest", "--input", str(pool), "--out", str(out)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.rstrip().endswith(f": {out}"), err

    cfg = yaml.safe_load(DEMO.read_text())
    cfg.update(input=str(pool), out_dir=str(tmp_path / "run"), name="full")
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(tmp_path / "full.yaml"), "--to", "ingest"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.rstrip().endswith(f": {tmp_path / 'run' / 'ingest'}"), err


# -- scratch folders do not outlive their process -------------------------------------------------
def test_scratch_folders_do_not_outlive_their_process(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    pool = str(write_pool(tmp_path / "pool.jsonl", 8))
    r = lmmixup("ingest", "--input", pool, "--out", str(tmp_path / "a"), env=env)
    assert r.returncode == 0 and not list(scratch.iterdir()), r.stderr[-2000:]  # a finished run leaves nothing

    # a process that dies before its exit handler runs (as under SIGKILL) leaves its folder ...
    died = "import os, sys\nfrom lmmixup_hf.data.io import read_pool\nread_pool(sys.argv[1])\nos._exit(0)"
    subprocess.run([sys.executable, "-c", died, pool], env={**os.environ, **env}, check=True, timeout=120)
    (left,) = scratch.iterdir()
    assert left.name.startswith("lmmixup-") and list(left.glob("pool-*.arrow"))
    # ... and the next one removes it
    r = lmmixup("ingest", "--input", pool, "--out", str(tmp_path / "b"), env=env)
    assert r.returncode == 0 and not list(scratch.iterdir()), r.stderr[-2000:]
