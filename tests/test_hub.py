"""Cards render and round-trip; push and pull go through huggingface_hub against an in-memory Hub
served at the HTTP boundary (an ``httpx2.MockTransport`` installed with ``set_client_factory``)."""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard, ModelCard
from huggingface_hub.utils import _http

from lmmixup_hf.integrations.hub import PullArgs, PushArgs, dataset_card, model_card, pull, push

TOKEN = "hf_testsecret0123456789"


class FakeHub:
    """Just enough of the Hub's REST API for create_repo, upload_folder and snapshot_download."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.auth: set[str] = set()
        self.unknown: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.auth.add(request.headers.get("authorization", ""))
        path = request.url.path
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            self.repos.setdefault(f"{body.get('type', 'model')}:{repo}", {})
            prefix = "datasets/" if body.get("type") == "dataset" else ""
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{prefix}{repo}", "name": repo})
        if request.method == "POST" and path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        m = re.match(r"^/api/(models|datasets)/(.+?)/(preupload|commit|revision|tree)/([^/]+)$", path)
        if m:
            kind, repo, op, _rev = m.groups()
            key = f"{kind[:-1]}:{repo}"
            if op == "preupload":
                files = json.loads(request.content)["files"]
                return httpx2.Response(
                    200,
                    json={
                        "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                        "commitOid": "0" * 40,
                    },
                )
            if op == "commit":
                for line in request.content.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        self.repos[key][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                return httpx2.Response(
                    200,
                    json={
                        "commitUrl": f"https://huggingface.co/{repo}/commit/{'1' * 40}",
                        "commitOid": "1" * 40,
                        "pullRequestUrl": None,
                    },
                )
            if op == "tree":
                return httpx2.Response(
                    200,
                    json=[
                        {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for p, b in self.repos[key].items()
                    ],
                )
            if op == "revision":
                files = self.repos[key]
                return httpx2.Response(
                    200,
                    json={
                        "id": repo,
                        "sha": "1" * 40,
                        "siblings": [
                            {"rfilename": p, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()}
                            for p, b in files.items()
                        ],
                    },
                )
        m = re.match(r"^/(datasets/)?(.+?)/resolve/([^/]+)/(.+)$", path)
        if m:
            kind, repo, _rev, filename = m.groups()
            data = self.repos[f"{'dataset' if kind else 'model'}:{repo}"].get(filename)
            if data is None:
                return httpx2.Response(404, headers={"x-error-code": "EntryNotFound"})
            headers = {
                "x-repo-commit": "1" * 40,
                "etag": f'"{hashlib.sha1(data).hexdigest()}"',
                "content-length": str(len(data)),
            }
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        self.unknown.append(f"{request.method} {path}")
        return httpx2.Response(404, json={"error": f"fake hub: no route for {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), follow_redirects=True))
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def stage_folder(root: Path) -> Path:
    """A finished distill stage output."""
    (root / "data").mkdir(parents=True)
    (root / "unparsed").mkdir()
    (root / ".work").mkdir()
    (root / ".work" / "scratch.parquet").write_bytes(b"partial")
    table = pa.table(
        {
            "id": ["mixup-dolly-0"],
            "cluster_id": [0],
            "prompt": ["When?"],
            "completion": ["1890s."],
            "output": ["Q: When?\nA: 1890s."],
            "think": ["merge"],
        }
    )
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 0), root / "unparsed" / "train-00000-of-00001.parquet")
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "stage": "distill",
                "fingerprint": "abc",
                "params": {"model": "m"},
                "counts": {"distilled": 1, "unparsed": 0},
            }
        )
    )
    return root


def test_model_card_renders_and_round_trips(tmp_path):
    card = model_card(
        "lm-mixup-qwen2.5-1.5b",
        repo_id="org/lm-mixup",
        base_model="Qwen/Qwen2.5-1.5B-Instruct",
        datasets=["dokiik/MIXTURE"],
        eval_results={"MMLU": {"acc": 0.512}, "GSM8K": {"exact_match": 0.3}},
        dataset_types={"MMLU": "cais/mmlu"},
    )
    text = str(card)
    for section in (
        "## Method",
        "## Training data",
        "## Rewards",
        "## Evaluation",
        "## Intended use",
        "## Limitations",
    ):
        assert section in text
    assert "| MMLU | acc | 0.512 |" in text and 'model="org/lm-mixup"' in text
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "Qwen/Qwen2.5-1.5B-Instruct" and "lm-mixup" in loaded.data.tags
    results = {(r.dataset_name, r.metric_type): (r.dataset_type, r.metric_value) for r in loaded.data.eval_results}
    assert results == {("MMLU", "acc"): ("cais/mmlu", 0.512), ("GSM8K", "exact_match"): ("GSM8K", 0.3)}
    assert "model-index" in (tmp_path / "README.md").read_text()


def test_dataset_card_describes_stage_folder(tmp_path):
    card = dataset_card(stage_folder(tmp_path / "distilled"), "org/distilled")
    card.save(tmp_path / "README.md")
    loaded = DatasetCard.load(tmp_path / "README.md")
    configs = {c["config_name"]: c for c in loaded.data.configs}
    assert configs["default"]["data_files"] == [{"split": "train", "path": "data/*.parquet"}]
    assert configs["default"]["default"] is True and "unparsed" in configs
    text = (tmp_path / "README.md").read_text()
    assert "| `default` | `data/` | 1 |" in text and "| `think` |" in text and '"fingerprint": "abc"' in text


def test_push_and_pull_round_trip_over_http(fake_hub, tmp_path, tiny_qwen_dir):
    model_url = push(PushArgs(repo_id="org/distiller", model_dir=tiny_qwen_dir, write_card=False))
    assert "org/distiller/commit" in model_url
    assert set(fake_hub.repos["model:org/distiller"]) >= {"config.json", "model.safetensors", "tokenizer.json"}

    stage = stage_folder(tmp_path / "distilled")
    push(PushArgs(repo_id="org/distilled", dataset_dir=str(stage)))
    files = fake_hub.repos["dataset:org/distilled"]
    assert "README.md" in files and "data/train-00000-of-00001.parquet" in files
    assert not any(p.startswith(".work") for p in files)  # scratch space is never uploaded

    assert not (stage / "README.md").exists()  # the card was staged in memory, not in the user's folder
    assert b"org/distilled" in files["README.md"]

    local = pull(PullArgs(repo_id="org/distilled", out=str(tmp_path / "pulled"), repo_type="dataset"))
    pulled = Path(local)
    for rel in files:
        expected = files[rel] if rel == "README.md" else (stage / rel).read_bytes()
        assert (pulled / rel).read_bytes() == expected
    assert pq.read_table(pulled / "data").to_pylist()[0]["output"] == "Q: When?\nA: 1890s."
    assert fake_hub.unknown == []
    assert fake_hub.auth == {f"Bearer {TOKEN}"}  # the token came from the environment
    for f in list(pulled.rglob("*")) + list(stage.rglob("*")):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes()


def test_push_cli_needs_exactly_one_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmmixup_hf.cli", "push", "--repo-id", "org/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "exactly one of --model_dir or --dataset_dir" in proc.stderr


def test_push_and_pull_to_an_unreachable_hub_fail_in_one_line(tmp_path, tiny_qwen_dir):
    """A Hub that refuses connections (a closed loopback port): one line and exit 1, no traceback."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    env.update(HF_HUB_OFFLINE="0", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    for argv in (
        ["push", "--repo_id", "org/x", "--model_dir", tiny_qwen_dir],
        ["pull", "--repo_id", "org/x", "--out", str(tmp_path / "pulled")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "lmmixup_hf.cli", *argv], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "org/x: could not reach the Hub" in proc.stderr, proc.stderr[-2000:]
        assert TOKEN not in proc.stderr
