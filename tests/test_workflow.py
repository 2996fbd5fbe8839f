"""Stage manifests: skip when inputs and parameters match, rerun when either changes, never keep secrets."""

import json
import subprocess
import sys

from datasets import Dataset

from lmmixup_hf.data.schema import compress_score, is_high_quality, normalize_task_type
from lmmixup_hf.pipeline.workflow import StageRun, redact


def test_manifest_skip_and_invalidate(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a", "completion": "b"}\n')
    run = StageRun("demo", tmp_path / "out", inputs=[inp], params={"k": 1, "api_key": "sk-secret"})
    assert not run.is_complete()
    run.quarantine.add(inp, 3, "prompt", "empty")
    m = run.finish(Dataset.from_list([{"x": 1}]), counts={"rows": 1})
    assert m["counts"] == {"rows": 1, "rejected": 1}
    assert "api_key" not in m["params"] and "sk-secret" not in (tmp_path / "out" / "manifest.json").read_text()
    assert set(m["versions"]) >= {"python", "lmmixup-hf", "datasets", "torch"}

    assert StageRun("demo", tmp_path / "out", inputs=[inp], params={"k": 1}).is_complete()
    assert not StageRun("demo", tmp_path / "out", inputs=[inp], params={"k": 2}).is_complete()
    inp.write_text('{"prompt": "a", "completion": "changed"}\n')
    assert not StageRun("demo", tmp_path / "out", inputs=[inp], params={"k": 1}).is_complete()
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rejected == [{"file": str(inp), "line": 3, "field": "prompt", "reason": "empty", "raw": None}]


def test_redact_is_recursive():
    assert redact({"a": 1, "OPENAI_API_KEY": "x", "judge": {"token": "t", "model": "m", "hf_token": "h"}}) == {
        "a": 1,
        "judge": {"model": "m"},
    }
    kept = {"max_new_tokens": 8, "max_prompt_tokens": 9, "tokenizer": "t", "tokens_per_minute": 1}
    assert redact(kept) == kept


def test_score_scale():
    assert [compress_score(r) for r in range(1, 11)] == [0, 0, 0, 0, 1, 2, 3, 4, 5, 5]
    assert is_high_quality(4) and not is_high_quality(3) and not is_high_quality(None)
    assert normalize_task_type("para_mixup") == "para" and normalize_task_type(None) == "qa"


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lmmixup_hf.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_ingest_flags_yaml_and_resume(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        '{"prompt": "What is 2+2?", "completion": "4", "source": "math"}\n'
        "not json\n"
        '{"instruction": "Name a planet.", "output": "Mars"}\n'
    )
    out = tmp_path / "ingested"
    r = _cli("ingest", "--input", str(pool), "--out", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"rows_in": 3, "rows_out": 2, "rejected": 1}
    assert manifest["rejected_by_reason"] == {"malformed JSON": 1}
    assert "rejected 1 row: 1 malformed JSON" in r.stderr

    r2 = _cli("ingest", "--input", str(pool), "--out", str(out), "--max-chars", "100000")  # dashes work too
    assert "up to date, skipping" in r2.stderr

    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(f"input: {pool}\nout: {tmp_path / 'from_yaml'}\nmax_chars: 14\n")
    r3 = _cli("ingest", "--config", str(cfg))
    assert r3.returncode == 0, r3.stderr
    m3 = json.loads((tmp_path / "from_yaml" / "manifest.json").read_text())
    assert m3["params"]["max_chars"] == 14 and m3["counts"]["rows_out"] == 1


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("ingest", "--input", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("lmmixup ingest: error:")
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: x\nout: y\nbogus: 1\n")
    r = _cli("ingest", "--config", str(bad))
    assert r.returncode == 2 and "bad.yaml: bogus: unknown option for `lmmixup ingest`" in r.stderr
    assert _cli("nope").returncode == 2
    assert "ingest" in _cli("--help").stdout
    assert "--max_chars" in _cli("ingest", "--help").stdout
