"""`pipeline("instruction-distillation")`: registration, inputs, batching, and loading a saved folder
through `trust_remote_code` in a fresh process where lmmixup_hf cannot be imported."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import pipeline

import lmmixup_hf  # noqa: F401  (registers the task)
from lmmixup_hf.distiller.hf_pipeline import PROMPT_CONFIG_KEY, TASK, InstructionDistillationPipeline
from lmmixup_hf.distiller.prompts import build_messages, instruction_for, linearize_cluster, prompt_token_count
from lmmixup_hf.distiller.response_parsing import parse_response

ROOT = Path(__file__).resolve().parents[1]

CLUSTER = ["Q: what is a tulip\nA: a flower", "Q: where do tulips come from\nA: central asia"]
PAIRS = [("what is a tulip", "a flower"), ("where do tulips come from", "central asia")]


@pytest.fixture(scope="module")
def pipe(tiny_qwen_dir):
    return pipeline(TASK, model=tiny_qwen_dir, device="cpu")


def check(out, task_type="qa"):
    assert set(out) >= {"instruction", "output", "think", "prompt", "completion", "raw_response", "parse_error"}
    assert out["instruction"] == instruction_for(task_type)
    parsed = parse_response(out["raw_response"], task_type)
    assert (out["output"], out["think"], out["parse_error"]) == (parsed.output, parsed.think, parsed.error)


def test_registered_on_import(pipe):
    assert isinstance(pipe, InstructionDistillationPipeline)


def test_input_forms(pipe):
    one = pipe(CLUSTER, max_new_tokens=6)
    assert isinstance(one, dict)
    check(one)
    # the same cluster as (prompt, completion) tuples, dicts and a {"pairs"} dict gives the same prompt
    as_dicts = [{"prompt": p, "completion": c} for p, c in PAIRS]
    assert pipe.messages_for(CLUSTER) == pipe.messages_for(PAIRS) == pipe.messages_for(as_dicts)
    assert pipe({"pairs": PAIRS}, max_new_tokens=6)["raw_response"] == one["raw_response"]
    check(pipe({"pairs": PAIRS, "task_type": "cs"}, max_new_tokens=6), "cs")
    check(pipe(PAIRS, task_type="tfq_mixup", max_new_tokens=6), "tfq_mixup")


def test_batches_match_single_calls(pipe):
    clusters = [CLUSTER, {"pairs": PAIRS[:1], "task_type": "para"}, [CLUSTER[1]]]
    batched = pipe(clusters, max_new_tokens=6, batch_size=2)
    assert isinstance(batched, list) and len(batched) == 3
    singles = [pipe(c, max_new_tokens=6) for c in clusters]
    assert [b["raw_response"] for b in batched] == [s["raw_response"] for s in singles]
    check(batched[1], "para")


def test_prompt_budget_drops_whole_members(pipe):
    long = ["Q: " + "word " * 200 + "\nA: x", *CLUSTER]
    full = prompt_token_count(pipe.tokenizer, pipe.messages_for(long))
    budget = prompt_token_count(pipe.tokenizer, pipe.messages_for(long[:1]))
    assert full > budget
    out = pipe(long, max_new_tokens=2, max_prompt_tokens=budget)
    assert out["n_dropped"] == 2


SCRIPTED = {
    "qa": "<think>both ask about tulips</think><answer>Q: Where do tulips come from?\nA: Central Asia.</answer>",
    "mcq": "<think>one stem</think><answer>Q: Which is a flower?\nA) Tulip\nB) Oak\nAnswer: A</answer>",
    "tfq": "<think>a claim</think><answer>Q: Tulips are flowers.\nAnswer: True</answer>",
}

SUBPROCESS = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockLmmixup(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "lmmixup_hf":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, BlockLmmixup())
    try:
        import lmmixup_hf  # noqa: F401
        importable = True
    except ModuleNotFoundError:
        importable = False

    from transformers import pipeline

    pipe = pipeline(model=sys.argv[1], trust_remote_code=True, device="cpu")
    members = json.loads(sys.argv[2])
    out = pipe(members, max_new_tokens=6)
    batch = pipe([members, {"pairs": members[:1], "task_type": "cs"}], max_new_tokens=6, batch_size=2)
    scripted = {}  # a good reply of each task type through postprocess, as a trained model would write it
    for task, reply in json.loads(sys.argv[3]).items():
        ids = pipe.tokenizer(reply, return_tensors="pt", add_special_tokens=False)["input_ids"]
        scripted[task] = pipe.postprocess(
            {"generated": ids, "task_type": task, "instruction": "merge", "n_dropped": 0}
        )
    print(json.dumps({
        "importable": importable,
        "loaded": sorted(m for m in sys.modules if m.startswith("lmmixup_hf")),
        "class": type(pipe).__module__ + "." + type(pipe).__name__,
        "messages": {t: pipe.messages_for(members, t) for t in ("qa", "mcq", "tfq", "cs", "para")},
        "out": out,
        "batch": batch,
        "scripted": scripted,
    }))
    """
)


def test_saved_folder_loads_with_trust_remote_code_without_the_package(pipe, tmp_path):
    saved = tmp_path / "distiller"
    pipe.save_pretrained(str(saved))
    config = json.loads((saved / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "hf_pipeline.InstructionDistillationPipeline"
    assert config[PROMPT_CONFIG_KEY]["system"] == build_messages("x")[0]["content"]
    assert (saved / "hf_pipeline.py").exists()

    workdir = tmp_path / "elsewhere"  # no lmmixup_hf on the path, nor in the cwd
    workdir.mkdir()
    script = workdir / "load.py"
    script.write_text(SUBPROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(saved), json.dumps(CLUSTER), json.dumps(SCRIPTED)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["importable"] is False and result["loaded"] == []
    assert result["class"].endswith("hf_pipeline.InstructionDistillationPipeline")
    assert result["class"].startswith("transformers_modules")
    # the prompt rebuilt from the saved spec is exactly the package's prompt
    for task, messages in result["messages"].items():
        assert messages == build_messages(linearize_cluster(CLUSTER), task)
    # same generations as in this process (greedy), same tag extraction
    assert result["out"]["raw_response"] == pipe(CLUSTER, max_new_tokens=6)["raw_response"]
    assert result["out"]["instruction"] == instruction_for("qa")
    assert {"instruction", "output", "think"} <= set(result["out"])
    assert len(result["batch"]) == 2 and result["batch"][1]["instruction"] == instruction_for("cs")
    assert set(result["out"]) == set(pipe(CLUSTER, max_new_tokens=6))  # the same keys in both places
    # a good reply gives the same dict, prompt/completion and task format check included
    for task, reply in SCRIPTED.items():
        ids = pipe.tokenizer(reply, return_tensors="pt", add_special_tokens=False)["input_ids"]
        here = pipe.postprocess({"generated": ids, "task_type": task, "instruction": "merge", "n_dropped": 0})
        assert result["scripted"][task] == here, task
        assert here["prompt"] and here["completion"] and here["parse_error"] is None, here
    assert (saved / "response_parsing.py").read_text() == (
        ROOT / "lmmixup_hf" / "distiller" / "response_parsing.py"
    ).read_text()
    shutil.rmtree(tmp_path / "modules", ignore_errors=True)
