"""`executor: ray`: the same rows as the local executor, and no row lost or duplicated when an actor
or the driver dies mid-stage.

Every Ray cluster here is private and bound to 127.0.0.1 (Ray's single-machine mode), with 2 CPUs.
The chain tests reuse the 40-row chain of test_pipeline.py (loopback judge and distiller, MiniLM).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray is imported
ray = pytest.importorskip("ray")

import test_pipeline as chain  # noqa: E402  (the 40-row chain's fixtures and helpers)
from test_pipeline import KEY, ROOT, lmmixup, manifest, rows, served_config  # noqa: E402

server, subset, clean_run = chain.server, chain.subset, chain.clean_run  # the fixtures, shared
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors get this module's helpers by value

from lmmixup_hf.data.schema import LmmixupError  # noqa: E402
from lmmixup_hf.execution.base import Executor, PoolOptions  # noqa: E402
from lmmixup_hf.pipeline import registry  # noqa: E402
from lmmixup_hf.pipeline.executors import RayOptions, make_executor  # noqa: E402
from lmmixup_hf.pipeline.run import load_config  # noqa: E402

RAY_SECTION = {
    "num_cpus": 2,
    "rate": {"actors": 2, "batch_size": 8},
    "rerate": {"actors": 1, "batch_size": 4},
    "embed": {"actors": 1, "batch_size": 16},
    "distill": {"actors": 2},
    "longtail": {"actors": 2, "batch_size": 8},
}


def ray_config(tmp: Path, server, subset, name: str, **ray_changes) -> Path:
    """The 40-row chain's config with `executor: ray`."""
    import yaml

    path = served_config(tmp, server, subset, name)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(executor="ray", ray={**RAY_SECTION, **ray_changes})
    path.write_text(yaml.safe_dump(cfg))
    return path


def by_id(stage_dir: Path, split: str = "data") -> dict[str, dict]:
    return {r["id"]: r for r in rows(stage_dir, split)}


def assert_same_rows(a: dict[str, dict], b: dict[str, dict], where: str) -> None:
    """Equal row sets and values; floats (embeddings, scores) to 1e-5."""
    assert a.keys() == b.keys(), where
    for key in a:
        for col in a[key]:
            x, y = a[key][col], b[key][col]
            if col in ("embedding", "long_tail", "long_tail_raw"):
                np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), atol=1e-5, err_msg=where)
            else:
                assert x == y, f"{where}: row {key}, column {col}: {x!r} != {y!r}"


# -- options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "section, message",
    [
        ({"adress": "auto"}, "ray.adress: unknown option (did you mean 'address'?)"),
        ({"rate": {"actor": 2}}, "ray.rate.actor: unknown option (did you mean 'actors'?)"),
        ({"rate": {"actors": 0}}, "ray.rate.actors 0: expected a value >= 1"),
        ({"distill": {"num_gpus": -1}}, "ray.distill.num_gpus -1: expected a value >= 0"),
        ({"embed": 4}, "ray.embed: expected a mapping"),
        ({"num_cpus": "two"}, "ray.num_cpus: expected int"),
    ],
)
def test_bad_ray_options_name_the_key(section, message):
    with pytest.raises(LmmixupError, match=re.escape(message)):
        RayOptions.from_config(section)


def test_ray_options_defaults_and_per_part_pools():
    opts = RayOptions.from_config({"address": "auto", "distill": {"actors": 4, "num_gpus": 1}})
    assert opts.address == "auto" and opts.pool("distill").num_gpus == 1 and opts.pool("distill").actors == 4
    executor = make_executor("ray", opts)  # nothing starts before the first batch
    assert (
        executor.batch_size(registry.stage("rate").part("rate")) == 1024
        and executor.batch_size(registry.stage("distill").parts[0]) == 1
    )
    assert opts.pool("rate").actors == 2 and opts.pool("a part nobody declared") == PoolOptions()
    assert make_executor("local").name == "local" and isinstance(make_executor(), Executor)
    with pytest.raises(LmmixupError, match="executor: 'spark'"):
        make_executor("spark")


def test_config_checks_executor_and_ray_section(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "a", "completion": "b"}\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"input: {pool}\nexecutor: spark\n")
    with pytest.raises(LmmixupError, match="executor 'spark': expected one of local, ray"):
        load_config(bad)
    bad.write_text(f"input: {pool}\nexecutor: ray\nray: {{rate: {{actors: 0}}}}\n")
    with pytest.raises(LmmixupError, match=r"bad.yaml: ray.rate.actors"):
        load_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"input: {pool}\nexecutor: ray\nray: {{address: auto, distill: {{num_gpus: 1}}}}\n")
    assert load_config(ok).executor == "ray"
    assert load_config(ok, {"executor": "local"}).executor == "local"  # what --executor does


# -- the chain --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_chain_gives_the_rows_of_the_local_chain(clean_run, server, subset, tmp_path):
    config = ray_config(tmp_path, server, subset, "onray")
    r = lmmixup("run", "--config", str(config))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "executor: ray" in r.stderr
    out = tmp_path / "onray"
    for stage, split in [
        ("ingest", "data"),
        ("rate", "data"),
        ("split", "low"),
        ("cluster", "data"),
        ("cluster", "clusters"),
        ("distill", "data"),
        ("distill", "unparsed"),
        ("rerate", "data"),
        ("filter", "data"),
        ("longtail", "data"),
        ("longtail", "reference"),
    ]:
        key = "cluster_id" if split == "clusters" else "id"
        a = {r[key]: r for r in rows(out / stage, split)}
        b = {r[key]: r for r in rows(clean_run / stage, split)}
        assert_same_rows(a, b, f"{stage}/{split}")
    assert sorted(r["id"] for r in rows(out / "mix")) == sorted(r["id"] for r in rows(clean_run / "mix"))
    assert manifest(out / "rate")["usage"]["executor"] == "ray"
    assert manifest(out / "distill")["engine"]["executor"] == "ray"
    assert manifest(out / "cluster")["executor"] == manifest(out / "longtail")["executor"] == "ray"
    assert manifest(clean_run / "cluster")["executor"] == "local"
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["executor"] == "ray" and run_json["address"] == "private cluster"
    assert manifest(out / "rate")["usage"]["n_requests"] == manifest(clean_run / "rate")["usage"]["n_requests"]
    for path in out.rglob("*"):  # the key reached the actors, and was written nowhere
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


# -- faults -----------------------------------------------------------------------------------------
def block_folder(stage_dir: Path):
    """The stage's block folder (parts and completion records) under its work folder."""
    from lmmixup_hf.execution.blocks import BlockFolder

    found = list(stage_dir.glob(".work/*/blocks"))
    assert len(found) == 1, found
    return BlockFolder(found[0])


def completed_rows(stage_dir: Path) -> list[str]:
    """The ids in the parts that have a completion record (a part without one is not done)."""
    folder = block_folder(stage_dir)
    return [i for b in sorted(folder.records()) for i in folder.read(b, ["id"])["id"].to_pylist()]


def settled(count, quiet: float = 3.0, limit: float = 60.0) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds: a worker of a killed driver may
    still finish (and record) the block it holds before Ray stops it."""
    last, since, deadline = count(), time.time(), time.time() + limit
    while time.time() - since < quiet and time.time() < deadline:
        time.sleep(0.2)
        now = count()
        if now != last:
            last, since = now, time.time()
    return last


CRASH_DIR = "LMMIXUP_TEST_CRASH_DIR"


def call_number(folder: str) -> int:
    """A number per call, shared by every process: the first free ``call-N`` file, taken atomically."""
    n = 0
    while True:
        try:
            os.close(os.open(os.path.join(folder, f"call-{n}"), os.O_CREAT | os.O_EXCL))
            return n
        except FileExistsError:
            n += 1


class CrashingJudge:
    """A real judge whose process dies (``os._exit``) on the third batch any actor gets."""

    def __init__(self, judge):
        self.judge = judge
        self.usage = judge.usage

    def rate_many(self, items, **kwargs):
        if call_number(os.environ[CRASH_DIR]) == 2:
            os._exit(1)
        return self.judge.rate_many(items, **kwargs)

    def flush(self):  # the Judge protocol: a Ray actor commits the reply cache after each batch
        self.judge.flush()


class PoisonedJudge(CrashingJudge):
    """Its process dies on every batch holding the poisoned row."""

    def rate_many(self, items, **kwargs):
        if any("POISON" in it.text for it in items):
            os._exit(1)
        return self.judge.rate_many(items, **kwargs)


def poisoned_make_judge(*args, **kwargs):
    from lmmixup_hf.judge.judges import make_judge

    return PoisonedJudge(make_judge(*args, **kwargs))


def crashing_make_judge(*args, **kwargs):
    from lmmixup_hf.judge.judges import make_judge

    return CrashingJudge(make_judge(*args, **kwargs))


def non_loopback_listeners() -> list[str]:
    """Sockets this process's children (the private cluster: GCS, raylet, workers) listen on
    outside 127.0.0.1."""
    import ipaddress

    import psutil

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback

    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "the private cluster's processes were not found"
    return [f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})" for c in listening if not loopback(c.laddr.ip)]


@pytest.fixture
def private_ray(tmp_path_factory):
    """An in-process private cluster (2 CPUs, loopback)."""
    crash_dir = tmp_path_factory.mktemp("calls")
    os.environ[CRASH_DIR] = str(crash_dir)  # workers inherit the environment the cluster starts with
    executor = make_executor("ray", {"num_cpus": 2, "rate": {"actors": 2, "batch_size": 8}})
    executor.start()
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert not non_loopback_listeners()
    yield executor, crash_dir
    executor.close()


@pytest.mark.slow
def test_an_actor_killed_mid_stage_loses_and_repeats_no_row(
    private_ray, clean_run, server, subset, tmp_path, monkeypatch
):
    from lmmixup_hf.pipeline import rate as rate_module
    from lmmixup_hf.pipeline.rate import RateArgs, rate

    executor, calls = private_ray
    monkeypatch.setattr(rate_module, "make_judge", crashing_make_judge)
    asked = server.n_requests
    out = tmp_path / "rate"
    args = RateArgs(
        input=str(clean_run / "ingest"),
        out=str(out),
        engine="openai",
        judge_model="stub-judge",
        base_url=server.base_url,
        api_key=KEY,
        cache_dir="none",
        max_concurrency=2,
        progress=False,
    )
    rate(args, executor=executor.for_stage("rate"))
    assert (calls / "call-2").exists() and len(list(calls.iterdir())) >= 40 // 8 + 1  # the crash happened
    records = block_folder(out).records()
    assert len(records) == 5 and sum(r["asked"] for r in records.values()) == 40
    ids = [r["id"] for r in rows(clean_run / "ingest")]
    assert completed_rows(out) == ids  # every row once, in its block: none lost, none twice
    assert server.n_requests - asked == 40  # the crashed block died before asking: nothing asked twice
    assert manifest(out)["complete"] is True
    assert_same_rows(by_id(out), by_id(clean_run / "rate"), "rate after an actor crash")


@pytest.mark.slow
def test_a_batch_that_kills_every_actor_fails_the_stage_and_keeps_the_rest(server, tmp_path, monkeypatch):
    """Retries are bounded: the stage fails with one clear line, the other blocks stay complete,
    and the rerun (the row fixed) asks only for the missing block."""
    from lmmixup_hf.data.schema import ServiceError
    from lmmixup_hf.pipeline import rate as rate_module
    from lmmixup_hf.pipeline.rate import RateArgs, rate

    pool = tmp_path / "pool.jsonl"
    texts = [f"Question {i}: what is {i} plus {i}?" for i in range(16)]
    texts[13] += " POISON"
    pool.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": t, "completion": str(2 * i)}) + "\n" for i, t in enumerate(texts))
    )
    executor = make_executor("ray", {"num_cpus": 2, "max_retries": 1, "rate": {"actors": 2, "batch_size": 4}})
    args = RateArgs(
        input=str(pool),
        out=str(tmp_path / "rate"),
        engine="openai",
        judge_model="stub-judge",
        base_url=server.base_url,
        api_key=KEY,
        cache_dir="none",
        progress=False,
    )
    try:
        monkeypatch.setattr(rate_module, "make_judge", poisoned_make_judge)
        with pytest.raises(ServiceError, match="rate on Ray: a batch failed after 1 retries"):
            rate(args, executor=executor.for_stage("rate"))
        done = {int(i[1:]) for i in completed_rows(tmp_path / "rate")}
        assert 13 not in done and done <= set(range(16)) and len(done) >= 4
        from lmmixup_hf.judge.judges import make_judge

        monkeypatch.setattr(rate_module, "make_judge", make_judge)  # the row no longer kills its actor
        asked = server.n_requests
        rate(args, executor=executor.for_stage("rate"))
        assert server.n_requests - asked == 16 - len(done)
        assert manifest(tmp_path / "rate")["counts"]["rated"] == 16
    finally:
        executor.close()


@pytest.mark.slow
def test_driver_killed_mid_stage_then_rerun(clean_run, subset, tmp_path):
    """SIGKILL the driver (and its private cluster) while it rates, rerun: every row rated exactly once."""
    from openai_server import OpenAIStubServer
    from test_pipeline import responder

    slow = OpenAIStubServer(responder, latency=0.25).start()
    try:
        config = ray_config(tmp_path, slow, subset, "killed", rate={"actors": 2, "batch_size": 4})
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "lmmixup_hf.cli", "run", "--config", str(config), "--to", "rate"]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        work = tmp_path / "killed" / "rate" / ".work"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(list(work.glob("*/blocks/part-*.json"))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        done_before = settled(lambda: len(completed_rows(tmp_path / "killed" / "rate")))
        assert 8 <= done_before < 40 and done_before % 4 == 0  # whole blocks of 4
        asked_before = slow.n_requests

        r = lmmixup("run", "--config", str(config), "--to", "rate")
        assert r.returncode == 0, r.stderr[-4000:]
        assert f"{done_before} already rated" in r.stderr, [x for x in r.stderr.splitlines() if "blocks" in x]
        assert manifest(tmp_path / "killed" / "rate")["counts"]["rated"] == 40
        assert slow.n_requests - asked_before <= 40 - done_before + 2 * 4  # at most the blocks in flight again
        assert_same_rows(by_id(tmp_path / "killed" / "rate"), by_id(clean_run / "rate"), "rate after a driver kill")
    finally:
        slow.stop()


# The driver runs the CLI in this process and reports its own peak RSS (Ray's workers and daemons
# are other processes). Its batches and row groups are shrunk to about 1 MB / 2,048 rows, so that a
# 20k-row pool is many of them: what the driver holds is then bounded by those, not by the pool
# (docs/benchmarks.md has the same measure at the default sizes, 20k against 200k rows).
DRIVER = """
import resource, sys
import lmmixup_hf.data.arrow_files as arrow_files, lmmixup_hf.data.stage_io as stage_io
arrow_files.BATCH_BYTES = stage_io.ROW_GROUP_BYTES = 1 << 20
stage_io.ROW_GROUP_ROWS = 2048
from lmmixup_hf.cli import main
rc = main(sys.argv[1:])
print("DRIVER_PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def rate_driver_peak(tmp: Path, server, rows: int) -> float:
    """`lmmixup run --to rate` on Ray over a ``rows``-row pool (ingest run before, in its own
    process): the rate driver's peak RSS in MiB."""
    import yaml

    tmp.mkdir(parents=True)
    pool = tmp / "pool.jsonl"
    with open(pool, "w") as f:
        for i in range(rows):
            row = {"id": f"r{i:07d}", "prompt": f"Question {i}: explain topic {i % 997}.", "source": "abc"[i % 3]}
            f.write(json.dumps({**row, "completion": f"Topic {i % 997} is example {i}. " + "Because. " * 20}) + "\n")
    served = {"engine": "openai", "base_url": server.base_url, "cache_dir": "none"}
    cfg = {
        "name": "peak",
        "input": str(pool),
        "out_dir": str(tmp / "run"),
        "executor": "ray",
        "ray": {"num_cpus": 2, "rate": {"actors": 2, "batch_size": 500}},
        "rate": {**served, "judge_model": "stub-judge", "max_concurrency": 64, "progress": False},
        "distill": {**served, "model": "stub-distiller"},
    }
    config = tmp / "peak.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = lmmixup("run", "--config", str(config), "--to", "ingest")
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-c", DRIVER, "run", "--config", str(config), "--to", "rate"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert manifest(tmp / "run" / "rate")["counts"]["rated"] == rows
    kb = next(int(x.split()[1]) for x in r.stderr.splitlines() if x.startswith("DRIVER_PEAK_KB"))
    return kb / 1024


@pytest.mark.slow
def test_the_rate_drivers_memory_does_not_grow_with_the_pool(tmp_path):
    """2k and 20k rows: the driver plans blocks from parquet metadata, collects completion records
    and streams the parts, so its peak stays flat (measured: +9 MiB; the driver that read and held
    every row grew by 60 MiB here, ~3 KB a row)."""
    from openai_server import OpenAIStubServer, judge_responder

    server = OpenAIStubServer(judge_responder).start()
    try:
        small = rate_driver_peak(tmp_path / "small", server, 2_000)
        large = rate_driver_peak(tmp_path / "large", server, 20_000)
    finally:
        server.stop()
    print(f"rate driver peak: {small:.1f} MiB at 2k rows, {large:.1f} MiB at 20k rows")
    assert large - small < 24, (small, large)


@pytest.mark.slow
def test_a_worker_node_lost_mid_stage_costs_retries_not_rows(clean_run, server, tmp_path):
    """Ray's simulated multi-node cluster, all on 127.0.0.1: a head with no CPUs (so every actor
    runs on a worker node) and two 1-CPU worker nodes; one node is removed while the blocks are
    being rated. Every block still completes exactly once, with the local executor's parts."""
    from functools import partial

    from ray.cluster_utils import Cluster

    from lmmixup_hf.data.stage_io import stage_files
    from lmmixup_hf.execution.base import LocalExecutor
    from lmmixup_hf.execution.blocks import BlockFolder, map_blocks, plan_blocks
    from lmmixup_hf.judge.judges import make_judge
    from lmmixup_hf.stages.rate import RateBlock

    plan = plan_blocks(stage_files(clean_run / "ingest"), 4)
    judge = partial(make_judge, "openai", "stub-judge", base_url=server.base_url, api_key=KEY, cache_dir=None)
    make = partial(RateBlock, judge, ["prompt", "completion"])
    part = registry.stage("rate").part("rate")
    list(map_blocks(LocalExecutor(), make, plan, tmp_path / "local", part))

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    executor = make_executor("ray", {"address": cluster.address, "rate": {"actors": 2, "batch_size": 4}})
    try:
        seen: list[str] = []
        for record in map_blocks(executor, make, plan, tmp_path / "ray", part):
            seen.append(record["block"])
            if len(seen) == 2:
                cluster.remove_node(nodes[0])  # mid-stage: 2 of 10 blocks in
        assert len(ray.nodes()) == 3 and sum(n["Alive"] for n in ray.nodes()) == 2
    finally:
        executor.close()
        ray.shutdown()
        cluster.shutdown()
    assert sorted(seen) == [b.id for b in plan]  # none lost, none twice
    local, remote = BlockFolder(tmp_path / "local"), BlockFolder(tmp_path / "ray")
    for b in plan:
        assert remote.read(b.id).equals(local.read(b.id)), b.id


@pytest.mark.slow
def test_transformers_distiller_on_actors_gives_the_local_rows(private_ray, clean_run, tiny_qwen_dir, tmp_path):
    """The engine is built once per actor from the stage's own settings; each actor distils whole
    chunks, so the generations (greedy, batched) are the local ones, token for token."""
    from lmmixup_hf.pipeline.distill import DistillArgs, distill

    executor, _ = private_ray
    common = dict(input=str(clean_run / "cluster"), model=tiny_qwen_dir, max_new_tokens=8, checkpoint_every=2, limit=6)
    local = distill(DistillArgs(out=str(tmp_path / "local"), **common))
    remote = distill(DistillArgs(out=str(tmp_path / "ray"), **common), executor=executor.for_stage("distill"))
    assert len(local) + len(rows(tmp_path / "local", "unparsed")) == 6
    assert_same_rows(by_id(tmp_path / "ray"), by_id(tmp_path / "local"), "distilled")
    assert_same_rows(by_id(tmp_path / "ray", "unparsed"), by_id(tmp_path / "local", "unparsed"), "unparsed")
    assert manifest(tmp_path / "ray")["engine"]["executor"] == "ray"
    assert len(remote) == len(local)


@pytest.mark.slow
def test_driver_killed_mid_distill_then_rerun(clean_run, subset, tmp_path):
    """The finished stages are copied from the clean run (fingerprints follow content, so they are
    up to date); the driver is SIGKILLed once the first block is written (its completion record);
    the rerun distils only the blocks that were not, and the rows are the local run's."""
    import shutil

    from openai_server import OpenAIStubServer
    from test_pipeline import responder

    slow = OpenAIStubServer(responder, latency=0.5).start()
    try:
        config = ray_config(tmp_path, slow, subset, "killed", distill={"actors": 1})
        out = tmp_path / "killed"
        for stage in ("ingest", "rate", "split", "cluster"):
            shutil.copytree(clean_run / stage, out / stage)
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "lmmixup_hf.cli", "run", "--config", str(config), "--to", "distill"]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 300
        while (
            time.time() < deadline and proc.poll() is None and not list(out.glob("distill/.work/*/blocks/part-*.json"))
        ):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        chunks = -(-manifest(clean_run / "distill")["counts"]["clusters"] // 2)  # checkpoint_every: 2
        done = settled(lambda: len(list(out.glob("distill/.work/*/blocks/part-*.json"))))
        assert 1 <= done < chunks
        asked = slow.n_requests

        r = lmmixup("run", "--config", str(config), "--to", "distill")
        assert r.returncode == 0, r.stderr[-4000:]
        clusters = manifest(clean_run / "distill")["counts"]["clusters"]
        assert f"resuming, {clusters - 2 * done} of {clusters} clusters left to distill" in r.stderr
        assert "rate: up to date" in r.stderr and "cluster: up to date" in r.stderr
        assert slow.n_requests - asked <= clusters - 2 * done + 2  # only the chunks not written (+ one in flight)
        for split in ("data", "unparsed"):
            assert_same_rows(by_id(out / "distill", split), by_id(clean_run / "distill", split), f"distill/{split}")
    finally:
        slow.stop()


@pytest.mark.slow
def test_cluster_groups_and_knn_search_on_ray_equal_the_local_ones(private_ray):
    """The two parts the chain cannot tell apart from a local fallback, checked directly: Ray's
    groupby-per-source clustering gives the local labels, and its shared-keys kNN the exact
    similarities (self-search without the row itself, and a search against other keys)."""
    from lmmixup_hf.embed.neighbors import knn
    from lmmixup_hf.stages.cluster import ClusterOptions, cluster_sources
    from lmmixup_hf.stages.cluster_groups import sources_on
    from lmmixup_hf.stages.longtail import knn_on

    executor, _ = private_ray
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    x = centres[rng.integers(0, 40, 600)] + 0.3 * rng.standard_normal((600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sources = np.asarray(rng.choice(["a", "b", "c"], 600), dtype=object)

    options = ClusterOptions(max_size=5)
    map_sources = sources_on(executor.for_stage("cluster"), registry.stage("cluster").part("cluster"))
    on_ray, local = map_sources(sources, x, options), cluster_sources(sources, x, options)
    assert on_ray.keys() == local.keys() == {"a", "b", "c"}
    for src in local:
        assert np.array_equal(on_ray[src].labels, local[src].labels) and on_ray[src].rounds == local[src].rounds
        assert (local[src].labels >= 0).any()

    search = knn_on(executor.for_stage("longtail"), registry.stage("longtail").part("longtail"))
    np.testing.assert_allclose(search(x, None, 15), knn(x, None, 15)[0], atol=1e-5)
    np.testing.assert_allclose(search(x[:50], x[50:], 15), knn(x[:50], x[50:], 15)[0], atol=1e-5)
