"""MIXTURE -> trainer formats, the prompt cap, SFT supervision, and the recipes end to end through
``accelerate launch`` (SmolLM2 on CPU), plus a slow GRPO run whose format reward must rise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from lmmixup_hf.distiller.prompts import build_messages, format_target, prompt_token_count
from lmmixup_hf.training.data import (
    cap_prompts,
    grpo_example,
    load_records,
    sft_example,
    to_grpo_dataset,
    to_sft_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT / "tests" / "fixtures" / "mixture"
SFT_FILE = MIRROR / "data_sft" / "qa" / "merged_train_qa_noisy.json"
GRPO_FILE = MIRROR / "data_grpo" / "llm_mixup" / "train.json"
REWARDS = ("quality_reward", "alignment_reward", "format_reward")


def test_sft_and_grpo_rows_use_the_shared_prompt():
    rec = json.loads(SFT_FILE.read_text())[0]
    row = sft_example(rec)
    assert row["prompt"] == build_messages(rec["input"], "qa", rec["instruction"])
    assert row["completion"] == [{"role": "assistant", "content": format_target(rec["output"], rec["cot"])}]
    assert row["completion"][0]["content"].startswith("<think>\n") and row["completion"][0]["content"].endswith(
        "</answer>"
    )
    assert row["task_type"] == "qa"

    grec = json.loads(GRPO_FILE.read_text())[0]
    g = grpo_example(grec)
    assert g["task_type"] == "mcq_mixup" and g["output"] == grec["output"]
    assert g["prompt"][0] == build_messages("", "mcq")[0]  # the system contract
    assert g["prompt"][1] == {"role": "user", "content": grec["input"]}  # instruction already merged in input
    # records without a task type fall back to `source`, then the default
    assert sft_example({"input": "x", "output": "y", "source": "tfq"})["task_type"] == "tfq"
    assert grpo_example({"input": "x", "output": "y"}, task_type="cs")["task_type"] == "cs_mixup"


def test_dataset_conversion_drops_empty_outputs_and_checks_columns():
    ds = Dataset.from_list(
        [{"input": "a", "output": "b", "task_type": "qa_mixup"}, {"input": "c", "output": " ", "task_type": "qa"}]
    )
    out = to_grpo_dataset(ds)
    assert len(out) == 1 and set(out.column_names) == {"prompt", "output", "task_type"}
    assert set(to_sft_dataset(ds).column_names) == {"prompt", "completion", "task_type"}
    from lmmixup_hf.data.schema import LmmixupError

    with pytest.raises(LmmixupError, match="missing output"):
        to_sft_dataset(Dataset.from_list([{"input": "a"}]))


def test_load_records_from_local_files(tmp_path):
    ds = load_records(str(GRPO_FILE))
    assert len(ds) == 42 and {"input", "output", "task_type"} <= set(ds.column_names)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ds.to_list()))
    assert load_records(str(path))["output"] == ds["output"]


def test_prompt_cap_truncates_members_or_drops(tiny_qwen_dir, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    members = [f"Q: question number {i} about the bridge\nA: answer number {i}" for i in range(12)]
    short = {"input": "\n\n".join(members[:1]), "output": "o", "task_type": "qa_mixup"}
    long = {"input": "\n\n".join(members), "output": "o", "task_type": "qa_mixup"}
    ds = to_grpo_dataset(Dataset.from_list([short, long]))
    n_short = prompt_token_count(tok, ds[0]["prompt"])
    n_long = prompt_token_count(tok, ds[1]["prompt"])
    cap = (n_short + n_long) // 2
    with caplog.at_level("WARNING"):
        capped = cap_prompts(ds, tok, cap, "truncate")
    assert "1 prompts truncated" in caplog.text
    assert len(capped) == 2 and capped[0]["prompt"] == ds[0]["prompt"]
    kept = capped[1]["prompt"]
    assert prompt_token_count(tok, kept) <= cap and kept[0] == ds[1]["prompt"][0]
    assert ds[1]["prompt"][1]["content"].startswith(kept[1]["content"])  # whole members dropped from the end
    assert len(cap_prompts(ds, tok, cap, "drop")) == 1
    assert len(cap_prompts(ds, tok, n_short - 1, "truncate")) == 0  # not even one member fits


@pytest.mark.parametrize("style", ["ours", "reference"])
def test_sft_supervises_completion_and_end_of_turn_only(tiny_qwen_dir, tmp_path, style):
    """The end-of-turn token closes every SFT target and is trained, in both prompt styles: a
    deliberate deviation from the reference, whose SFT text (prompt + target) had none, so its model
    never learned to stop (docs/distiller.md)."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    ds = to_sft_dataset(load_records(str(SFT_FILE)), prompt_style=style)
    cfg = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=4096,
        completion_only_loss=True,
        report_to=[],
    )
    trainer = SFTTrainer(model=tiny_qwen_dir, args=cfg, train_dataset=ds, processing_class=tok)
    for i in (0, 5):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        supervised = tok.decode(ids[labels != -100])
        target = ds[i]["completion"][0]["content"]
        assert target.endswith("</answer>") and not target.endswith(tok.eos_token)
        assert supervised.rstrip("\n") == target + tok.eos_token  # prompt masked, <|im_end|> trained
        prompt_text = tok.apply_chat_template(ds[i]["prompt"], tokenize=False, add_generation_prompt=True)
        assert tok.decode(ids[labels == -100]) == prompt_text


def _launch(script: str, config: str, out: Path, *extra: str) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [
        accelerate,
        "launch",
        "--config_file",
        "trainer_recipes/accelerate/cpu.yaml",
        "--num_cpu_threads_per_process",
        "1",
        f"trainer_recipes/{script}",
        "--config",
        config,
        "--max_steps",
        "2",
        "--output_dir",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow  # ~1-2 min on a contended 2-core CPU
def test_grpo_recipe_accelerate_launch(tmp_path, smollm2_dir, minilm_path):
    log = _launch("grpo.py", "trainer_recipes/configs/smollm2-135m-cpu/grpo.yaml", tmp_path / "grpo")
    for name in REWARDS:
        values = re.findall(rf"'rewards/{name}/mean': '([^']+)'", log)
        assert len(values) == 2, f"{name} not logged"
        assert all(0.0 <= float(v) <= 1.0 for v in values)
    assert "GRPO done" in log and (tmp_path / "grpo" / "model.safetensors").exists()


@pytest.mark.slow  # ~1 min on a contended 2-core CPU
def test_sft_recipe_accelerate_launch(tmp_path, smollm2_dir):
    log = _launch("sft.py", "trainer_recipes/configs/smollm2-135m-cpu/sft.yaml", tmp_path / "sft")
    losses = [float(v) for v in re.findall(r"'loss': '([^']+)'", log)]
    assert len(losses) == 2 and all(v > 0 for v in losses)
    assert "SFT done: 19 rows" in log and (tmp_path / "sft" / "model.safetensors").exists()


@pytest.mark.slow
def test_grpo_format_reward_rises(tiny_qwen_dir, tmp_path, monkeypatch):
    """A short cold start (SFT on 1/3 well-formatted targets) then 30 GRPO steps on the format reward
    alone: the share of well-formatted completions must grow."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from lmmixup_hf.rewards import format_reward

    monkeypatch.setenv("LMMIXUP_REWARD_MODE", "reference")
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    good = format_target("Q: What is it?\nA: It is a bridge.", "merge")
    bad = "Q: What is it?\nA: It is a bridge."
    prompt = [{"role": "user", "content": "Merge the related question-answer pairs below."}]
    rows = [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": good if i % 3 == 0 else bad}]}
        for i in range(64)
    ]
    cold = str(tmp_path / "cold")
    sft = SFTTrainer(
        model=tiny_qwen_dir,
        processing_class=tok,
        train_dataset=Dataset.from_list(rows),
        args=SFTConfig(
            output_dir=cold,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            max_length=256,
            learning_rate=3e-3,
            per_device_train_batch_size=8,
            num_train_epochs=20,
            report_to=[],
            save_strategy="no",
            seed=0,
        ),
    )
    sft.train()
    sft.save_model(cold)
    grpo = GRPOTrainer(
        model=cold,
        reward_funcs=[format_reward],
        processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": prompt, "task_type": "qa_mixup"}] * 480),
        args=GRPOConfig(
            output_dir=str(tmp_path / "grpo"),
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=16,
            num_generations=8,
            max_completion_length=40,
            learning_rate=1e-3,
            beta=0.0,
            max_steps=30,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            seed=0,
        ),
    )
    grpo.train()
    curve = [h["rewards/format_reward/mean"] for h in grpo.state.log_history if "rewards/format_reward/mean" in h]
    assert len(curve) == 30
    first, last = sum(curve[:5]) / 5, sum(curve[-10:]) / 10
    assert last > first + 0.15, curve


def test_mixture_builder_rows_convert():
    ds = load_records("mixture", "all-grpo", str(MIRROR), "train")
    rows = to_grpo_dataset(ds)
    assert len(rows) == len(ds) > 0
    assert all(t.endswith("_mixup") for t in rows["task_type"])
    assert rows[0]["prompt"][1]["content"] == ds[0]["input"].strip()  # instruction already merged by the split
    sft = to_sft_dataset(load_records("mixture", "all-sft", str(MIRROR), "train"))
    assert sft[0]["prompt"][1]["content"].startswith(load_records("mixture", "all-sft", str(MIRROR))[0]["instruction"])
