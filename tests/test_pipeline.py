"""`lmmixup run`: config validation, stage selection, the whole chain end to end through the CLI,
skip-when-done, and kill-anywhere-then-resume giving the same final output.

The end-to-end tests run the demo config on a 40-row subset of the bundled sample pool. The
judge and the distiller are served by a loopback OpenAI-compatible server whose replies are a
deterministic function of the request (rating by answer length, distilling by picking the fullest
member), so the data really flows through every stage in seconds; the embedder is the real
MiniLM. One slow test runs the demo's own local models (SmolLM2) on a few rows.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from openai_server import OpenAIStubServer, last_user_text

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.distiller.prompts import format_target
from lmmixup_hf.pipeline.run import STAGE_NAMES, RunArgs, load_config, run, select_stages, stage_args

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_pool.jsonl"
DEMO = ROOT / "configs" / "demo.yaml"
KEY = "sk-test-pipeline-secret-42"


# -- config validation ----------------------------------------------------------------------------
def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def demo_config(**changes) -> dict:
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["input"] = str(SAMPLE)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("config", ["demo.yaml", "tulu300k.yaml"])
def test_shipped_configs_validate_against_the_stages(config):
    cfg = load_config(ROOT / "configs" / config)
    built = {s.name: stage_args(s, cfg) for s in select_stages(None, None, None)}
    assert list(built) == list(STAGE_NAMES)
    assert built["cluster"].input == str(cfg.run_dir / "split" / "low")
    assert built["mix"].distilled == str(cfg.run_dir / "longtail")
    assert built["rerate"].engine == built["rate"].engine  # rerate inherits the rate section


def test_tulu300k_is_the_paper_recipe():
    cfg = load_config(ROOT / "configs" / "tulu300k.yaml")
    a = {s.name: stage_args(s, cfg) for s in select_stages(None, None, None)}
    assert (a["rate"].engine, a["rate"].judge_model) == ("openai", "gpt-4o-mini")
    assert a["cluster"].embedding_model == "BAAI/bge-m3"
    assert (a["cluster"].min_size, a["cluster"].max_size, a["cluster"].mean_cap, a["cluster"].std_cap) == (2, 5, 3, 1)
    assert a["distill"].engine == "vllm" and a["split"].threshold == 4 and a["filter"].min_score == 4
    assert (a["mix"].total, a["mix"].ratio, a["longtail"].k) == (10_000, 0.5, 15)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"clusterr": {}}, r"clusterr: unknown key \(did you mean 'cluster'\?\)"),
        ({"cluster": {"min_size": "two"}}, r"cluster\.min_size: expected int, got str 'two'"),
        (
            {"cluster": {"max_sise": 5}},
            r"cluster\.max_sise: unknown option .*did you mean 'max_size'.*known options: .*max_size",
        ),
        ({"rate": {"input": "x.jsonl"}}, r"rate\.input: set by the pipeline"),
        ({"input": "data/nope.jsonl"}, r"input: data/nope\.jsonl: no such file"),
        ({"mix": {"ratio": "half"}}, r"mix\.ratio: expected float"),
        ({"mix": [1, 2]}, r"mix: expected a mapping"),
        ({"seed": 1.5}, r"seed: expected int \| None"),
    ],
)
def test_bad_config_names_the_key(tmp_path, change, message):
    path = write_config(tmp_path / "bad.yaml", demo_config(**change))
    with pytest.raises(LmmixupError, match=message) as e:
        run(RunArgs(config=str(path), out_dir=str(tmp_path / "run")))
    assert str(path) in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing ran


def test_bad_config_through_the_cli(tmp_path):
    path = write_config(tmp_path / "bad.yaml", demo_config(cluster={"min_size": "two"}))
    r = subprocess.run(
        [sys.executable, "-m", "lmmixup_hf.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2
    assert "cluster.min_size: expected int, got str 'two'" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    r = subprocess.run(
        [sys.executable, "-m", "lmmixup_hf.cli", "run", "--config", str(tmp_path / "broken.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and "not valid YAML" in r.stderr


def test_stage_selection():
    names = lambda *a: [s.name for s in select_stages(*a)]  # noqa: E731
    assert names(None, None, None) == list(STAGE_NAMES)
    assert names("cluster", "distill", None) == ["cluster", "distill"]
    assert names(None, "rate", None) == ["ingest", "rate"]
    assert names(None, None, "mix") == ["mix"]
    for bad, msg in [
        (("nope", None, None), "unknown stage"),
        (("mix", "rate", None), "comes after"),
        (("rate", None, "mix"), "cannot be combined"),
    ]:
        with pytest.raises(LmmixupError, match=msg):
            select_stages(*bad)


def test_from_needs_the_upstream_outputs(tmp_path):
    path = write_config(tmp_path / "c.yaml", demo_config())
    with pytest.raises(LmmixupError, match=r"stage cluster needs the output of ingest"):
        run(RunArgs(config=str(path), out_dir=str(tmp_path / "run"), from_stage="cluster"))


# -- the chain end to end -------------------------------------------------------------------------
def responder(body: dict) -> str:
    """Judge: overall grows with the length of the rated text. Distiller: the fullest member's
    question with every member's answer, in the <think>/<answer> format; clusters of exactly two
    members get a reply with no tags."""
    system = body["messages"][0]["content"]
    user = last_user_text(body)
    if "rate the quality" in system:
        item = user.split("### ", 2)[-1]
        overall = min(9, 2 + len(item) // 45)
        return json.dumps({"rarity": 5, "complexity": 5, "informativeness": overall, "overall": overall})
    members = re.findall(r"^Q: (.*?)\nA: (.*?)(?=\n\nQ: |\Z)", user, flags=re.S | re.M)
    if len(members) == 2:
        return "Both items say roughly the same thing."
    q = max(members, key=lambda m: len(m[1]))[0]
    a = " ".join(sorted({m[1].strip() for m in members}, key=lambda x: (-len(x), x)))
    return format_target(f"Q: {q.strip()}\nA: {a}", f"Joined the answers of {len(members)} members.")


@pytest.fixture(scope="module")
def server():
    s = OpenAIStubServer(responder, latency=0.02).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """The first 41 lines of the sample pool: 40 rows and one deliberately broken one."""
    path = tmp_path_factory.mktemp("pool") / "pool40.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:41]))
    return path


def served_config(tmp: Path, server: OpenAIStubServer, subset: Path, name: str) -> Path:
    """The demo config on the subset, with the judge and distiller behind the loopback server."""
    out = tmp / name
    served = {
        "engine": "openai",
        "base_url": server.base_url,
        "cache_dir": str(out / "llm-cache"),
        "max_concurrency": 2,
    }
    cfg = demo_config(input=str(subset), out_dir=str(out), name=name)
    cfg["rate"] = {**served, "judge_model": "stub-judge", "progress": False}
    cfg["distill"] = {**served, "model": "stub-distiller", "max_new_tokens": 256, "checkpoint_every": 2}
    cfg["mix"] = {"total": 20, "ratio": 0.5, "allow_fewer": True}
    return write_config(tmp / f"{name}.yaml", cfg)


def lmmixup(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmmixup_hf.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def rows(stage_dir: Path, name: str = "data") -> list[dict]:
    """A stage's rows, NaN shown as None so that equal outputs compare equal."""
    files = sorted((stage_dir / name).glob("*.parquet"))
    nan_free = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731
    return [{k: nan_free(v) for k, v in r.items()} for f in files for r in pq.read_table(f).to_pylist()]


def manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, server, subset) -> Path:
    tmp = tmp_path_factory.mktemp("clean")
    config = served_config(tmp, server, subset, "clean")
    t0 = time.time()
    r = lmmixup("run", "--config", str(config))
    assert r.returncode == 0, r.stderr[-4000:]
    assert time.time() - t0 < 300
    return tmp / "clean"


@pytest.mark.slow
def test_end_to_end_on_40_rows(clean_run):
    m = {s: manifest(clean_run / s) for s in STAGE_NAMES if s not in ("report", "curate")}  # curate: off
    assert not (clean_run / "curate").exists()
    assert m["ingest"]["counts"]["rows_out"] == 40 and m["ingest"]["counts"]["rejected"] == 1
    split = m["split"]["counts"]
    assert split["high"] + split["low"] == m["rate"]["counts"]["rated"] == 40
    assert split["high"] > 0 and split["low"] > 0
    # rate writes its rows once (data/); the split stage alone writes high/ and low/
    rated = sorted((clean_run / "rate").rglob("*.parquet"))
    assert [p.parent.name for p in rated] == ["data"] * len(rated)
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in rated) == 40
    assert sum(p.stat().st_size for p in rated) == sum(
        p.stat().st_size for p in (clean_run / "rate" / "data").iterdir()
    )
    assert not [p for p in clean_run.rglob("*") if ".tmp-" in p.name]
    assert m["cluster"]["counts"]["clustered"] + m["cluster"]["counts"]["leftovers"] == split["low"]
    clusters = m["cluster"]["counts"]["clusters"]
    d = m["distill"]["counts"]
    assert d["distilled"] + d["unparsed"] == clusters and d["distilled"] > 0
    assert m["rerate"]["counts"]["rated"] == d["distilled"]
    f = m["filter"]["counts"]
    assert f["rows_out"] + f["below_threshold"] == d["distilled"]
    assert f["rows_out"] > 0  # distilled rows reach the mix
    assert m["longtail"]["counts"] == {"rows": f["rows_out"], "reference_rows": split["high"], "rejected": 0}

    mixed = rows(clean_run / "mix")
    assert len(mixed) == m["mix"]["counts"]["rows"] <= 20
    assert {r["origin"] for r in mixed} <= {"original", "distilled"}
    distilled = {r["id"]: r for r in rows(clean_run / "distill")}
    for r in (r for r in mixed if r["origin"] == "distilled"):
        assert r["id"] in distilled and r["prompt"] == distilled[r["id"]]["prompt"]
    high_ids = {r["id"] for r in rows(clean_run / "split" / "high")}
    assert all(r["id"] in high_ids for r in mixed if r["origin"] == "original")

    page = (clean_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "Example clusters" in page
    assert "Both items say roughly the same thing." in page  # an unparsed distillation, shown as it was
    effective = yaml.safe_load((clean_run / "config.yaml").read_text())
    assert effective["distill"]["input"] == str(clean_run / "cluster")
    for path in clean_run.rglob("*"):  # the key came from the environment and went nowhere
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_rerun_skips_every_stage(clean_run, server):
    before = {p: p.stat().st_mtime_ns for p in (clean_run / "mix" / "data").glob("*.parquet")}
    calls = server.n_requests
    r = lmmixup("run", "--config", str(clean_run.parent / "clean.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert server.n_requests == calls  # no judge or distiller call
    # every stage but the report, and curate (off unless enabled)
    assert r.stderr.count("up to date, skipping") == len(STAGE_NAMES) - 2
    assert {p: p.stat().st_mtime_ns for p in (clean_run / "mix" / "data").glob("*.parquet")} == before


@pytest.mark.slow
def test_only_reruns_one_stage(clean_run):
    r = lmmixup("run", "--config", str(clean_run.parent / "clean.yaml"), "--only", "report")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[1/1] report" in r.stderr and "[1/1] rate" not in r.stderr


@pytest.mark.slow
def test_kill_at_a_random_stage_then_resume(clean_run, server, subset, tmp_path):
    """SIGKILL the run shortly after a randomly chosen stage starts, rerun the same command, and
    get exactly the clean run's outputs."""
    rng = random.Random(int(os.environ.get("LMMIXUP_KILL_SEED", "9")))
    victim = rng.choice([s for s in STAGE_NAMES if s not in ("ingest", "curate", "report")])  # curate: off
    config = served_config(tmp_path, server, subset, "killed")
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmmixup_hf.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    marker = re.compile(rf"\[\d+/\d+\] {victim}: ")
    for line in proc.stderr:
        if marker.search(line):
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {victim} started"
    out = tmp_path / "killed"

    r = lmmixup("run", "--config", str(config))
    assert r.returncode == 0, r.stderr[-4000:]
    for stage, split in [
        ("rate", "data"),
        ("split", "high/data"),
        ("cluster", "data"),
        ("distill", "data"),
        ("distill", "unparsed"),
        ("rerate", "data"),
        ("filter", "data"),
        ("longtail", "data"),
        ("mix", "data"),
        ("mix", "messages"),
    ]:
        assert rows(out / stage, split) == rows(clean_run / stage, split), f"{victim} killed: {stage}/{split} differs"


# -- the demo's own models --------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_models_run_every_stage(tmp_path, smollm2_dir):
    """The demo config unchanged except for size: SmolLM2 judges and distils, MiniLM embeds."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:14]))
    cfg = demo_config(input=str(pool), out_dir=str(tmp_path / "demo"))
    cfg["distill"].update(limit=1, max_new_tokens=24)
    r = lmmixup("run", "--config", str(write_config(tmp_path / "demo.yaml", cfg)))
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "demo"
    rated = rows(out / "rate")
    assert len(rated) == 14 and all(r["rating"]["judge"] == "local:smollm2-135m-offline" for r in rated)
    d = manifest(out / "distill")["counts"]
    assert d["distilled"] + d["unparsed"] == 1
    assert (out / "report.html").exists() and (out / "mix" / "manifest.json").exists()


def test_split_by_top_share_ranks_by_score_then_expected(tmp_path):
    from datasets import Dataset

    from lmmixup_hf.pipeline.split import SplitArgs, split_rated
    from lmmixup_hf.pipeline.workflow import StageRun

    ratings = [(0, 1.2), (0, 2.9), (1, 1.0), (0, 2.5), None, (0, 1.9), (2, 3.0), (0, 2.0)]
    rows_in = [
        {
            "id": f"r{i}",
            "prompt": "q",
            "completion": "a",
            "rating": None if r is None else {"score": r[0], "raw": r[0] + 4, "expected": r[1]},
        }
        for i, r in enumerate(ratings)
    ]
    StageRun("rate", tmp_path / "rate").finish(Dataset.from_list(rows_in))
    high = split_rated(SplitArgs(input=str(tmp_path / "rate"), out=str(tmp_path / "split"), top_share=3 / 7))
    assert high["id"] == ["r1", "r2", "r6"]  # scores 2 and 1 first, then the best expected among the 0s
    assert sorted(rows(tmp_path / "split" / "low", "data"), key=lambda r: r["id"])[0]["id"] == "r0"
    m = manifest(tmp_path / "split")
    assert m["counts"] == {"rows_in": 8, "high": 3, "low": 4, "unscored": 1, "rejected": 1}
    (bad,) = [json.loads(x) for x in (tmp_path / "split" / "rejected.jsonl").read_text().splitlines()]
    assert (bad["line"], bad["field"], json.loads(bad["raw"])["id"]) == (5, "rating", "r4")


@pytest.mark.slow
def test_in_memory_chain_gives_the_rows_of_lmmixup_run(clean_run, server, subset, tmp_path):
    """The stage cores called on in-memory Datasets (docs/python-api.md) give the same rows as the
    `lmmixup run` of the same config on the same pool."""
    from lmmixup_hf.data.io import normalize
    from lmmixup_hf.data.quality import split_by_quality
    from lmmixup_hf.distiller.engines import make_engine
    from lmmixup_hf.embed.embeddings import row_embeddings
    from lmmixup_hf.judge.judges import make_judge
    from lmmixup_hf.stages.cluster import cluster_rows
    from lmmixup_hf.stages.distill import distill_rows
    from lmmixup_hf.stages.longtail import longtail_rows
    from lmmixup_hf.stages.mix import mix_rows
    from lmmixup_hf.stages.rate import rate_rows

    cfg = yaml.safe_load((clean_run.parent / "clean.yaml").read_text())
    records = []
    for line in subset.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the deliberately broken line; `lmmixup run` quarantines it
    pool, rejected = normalize(records, default_source="pool40")
    served = {"base_url": server.base_url, "api_key": KEY, "cache_dir": tmp_path / "llm"}
    judge = make_judge("openai", "stub-judge", **served)
    rated, failed, _ = rate_rows(pool, judge)
    assert not failed
    high, low, _ = split_by_quality(rated, top_share=cfg["split"]["top_share"])
    clustered = cluster_rows(low, row_embeddings(low, cfg["embedding_model"]), seed=cfg["seed"], **cfg["cluster"]).rows
    engine = make_engine("openai", "stub-distiller", **served)
    distilled, _ = distill_rows(clustered, engine, max_new_tokens=cfg["distill"]["max_new_tokens"])
    rerated, failed, _ = rate_rows(distilled, judge)
    kept, _, _ = split_by_quality(rerated, threshold=cfg["filter"]["min_score"])
    scored, reference, _ = longtail_rows(
        kept, row_embeddings(kept, cfg["embedding_model"]), high, row_embeddings(high, cfg["embedding_model"])
    )
    from lmmixup_hf.embed.embeddings import get_embedder

    embedder = get_embedder(cfg["embedding_model"])
    mixed, _ = mix_rows(
        reference,
        scored,
        total=cfg["mix"]["total"],
        ratio=cfg["mix"]["ratio"],
        allow_fewer=True,
        embed=embedder.encode,
    )

    def same(ours, stage: str, name: str = "data", cols=("id", "prompt", "completion")):
        theirs = rows(clean_run / stage, name)
        assert sorted(tuple(r[c] for c in cols) for r in ours) == sorted(tuple(r[c] for c in cols) for r in theirs), (
            stage
        )

    same(pool, "ingest")
    same(high, "split/high")
    same(clustered, "cluster", cols=("id", "cluster_id"))
    same(distilled, "distill", cols=("id", "prompt", "completion", "member_ids"))
    same(scored, "longtail", cols=("id", "long_tail"))
    assert [(r["id"], r["origin"]) for r in mixed] == [(r["id"], r["origin"]) for r in rows(clean_run / "mix")]


def test_split_and_filter_of_an_empty_rated_stage(tmp_path):
    """Nothing distilled means an empty rerate output: filter (and split) write empty outputs."""
    from datasets import Dataset, Features, Value

    from lmmixup_hf.pipeline.split import FilterArgs, SplitArgs, filter_rated, split_rated
    from lmmixup_hf.pipeline.workflow import StageRun

    features = Features({"id": Value("string"), "rating": {"score": Value("int64"), "raw": Value("int64")}})
    StageRun("rerate", tmp_path / "rerate").finish(Dataset.from_dict({"id": [], "rating": []}, features=features))
    kept = filter_rated(FilterArgs(input=str(tmp_path / "rerate"), out=str(tmp_path / "filter")))
    assert len(kept) == 0 and manifest(tmp_path / "filter")["complete"]
    high = split_rated(SplitArgs(input=str(tmp_path / "rerate"), out=str(tmp_path / "split")))
    assert len(high) == 0 and len(rows(tmp_path / "split" / "low", "data")) == 0
