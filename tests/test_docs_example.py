"""docs/python-api.md's example runs as written: its own code block is extracted and executed.

Only the two models are swapped, through the factories the example calls (``make_judge`` and
``make_engine``): the judge and the distiller are served by the loopback OpenAI-compatible server,
so the whole chain runs in seconds. Everything else, the sample pool with its broken lines included,
is the documented text.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from openai_server import OpenAIStubServer
from test_distill_faults import chain_responder

import lmmixup_hf.distiller.engines as engines
import lmmixup_hf.judge.judges as judges

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"


def python_block(path: Path) -> str:
    (block,) = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    return block


@pytest.fixture
def served_models(monkeypatch, tmp_path):
    """The example's make_judge / make_engine, answering through the loopback server."""
    server = OpenAIStubServer(chain_responder).start()
    make_judge, make_engine = judges.make_judge, engines.make_engine
    served = {"base_url": server.base_url, "api_key": "sk-doc-example"}
    asked = []

    def judge(engine, model, **kw):
        asked.append(("judge", engine, model))
        return make_judge("openai", "stub-judge", cache_dir=None, **served)

    def engine(name, model, **kw):
        asked.append(("engine", name, model, tuple(sorted(kw))))
        return make_engine("openai", "stub-distiller", show_progress=False, **served)

    monkeypatch.setattr(judges, "make_judge", judge)
    monkeypatch.setattr(engines, "make_engine", engine)
    monkeypatch.setenv("LMMIXUP_CACHE", str(tmp_path / "cache"))
    yield server, asked
    server.stop()


@pytest.mark.slow  # ~30 s on 2 busy cores, most of it loading MiniLM and embedding the pool
def test_python_api_example_runs_as_written(served_models, monkeypatch, capsys):
    server, asked = served_models
    monkeypatch.chdir(ROOT)  # the example reads data/sample_pool.jsonl from the repository root
    before = sorted(p.name for p in ROOT.iterdir())
    namespace: dict = {}
    exec(compile(python_block(DOC), str(DOC), "exec"), namespace)  # noqa: S102 - the documented code itself

    assert asked[0] == ("judge", "local", "smollm2-135m-offline")
    assert asked[1] == (
        "engine",
        "transformers",
        "smollm2-135m-offline",
        ("answer_prefix", "scaffold", "think_tokens"),
    )
    assert len(namespace["pool"]) == 281 and len(namespace["rejected"]) == 3  # line 102 among them
    assert 102 in {r.line for r in namespace["rejected"].rows}
    n_clusters = len(namespace["distilled"]) + len(namespace["unparsed"])
    assert n_clusters == min(12, namespace["clusters"].stats["clusters"])  # limit=12
    assert len(namespace["distilled"]) > 0 and len(namespace["mixed"]) > 0
    out = namespace["out"]
    assert out.is_file() and ROOT not in out.parents  # written to a temporary folder
    shutil.rmtree(out.parent)
    assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing new in the checkout
    assert f"{len(namespace['mixed'])} rows in {out}" in capsys.readouterr().out
    assert server.n_ok > 281
