"""One prompt: the SFT, GRPO and inference paths (stage, engines, pipeline) build identical messages."""

import pytest
from transformers import AutoTokenizer, pipeline

import lmmixup_hf  # noqa: F401  (registers the pipeline)
from lmmixup_hf.distiller.hf_pipeline import prompt_spec, render_messages
from lmmixup_hf.distiller.prompts import (
    TASK_INSTRUCTIONS,
    build_messages,
    fit_messages,
    format_target,
    instruction_for,
    linearize_cluster,
    user_content,
)
from lmmixup_hf.training.data import grpo_example, sft_example

PAIRS = [("when was the riverton bridge built", "1890s i think\r\n"), ("Riverton bridge made of?", " iron ")]


@pytest.mark.parametrize("task", list(TASK_INSTRUCTIONS))
def test_sft_grpo_and_inference_prompts_are_identical(task, tiny_qwen_dir):
    cluster = linearize_cluster(PAIRS)
    expected = build_messages(cluster, task)
    assert "\n\nQ: Riverton bridge made of?\nA: iron" in expected[1]["content"]  # real blank lines
    # SFT (MIXTURE SFT records: instruction kept apart) and GRPO (instruction merged into input)
    sft = sft_example({"input": cluster, "output": "x", "cot": "why", "task_type": task})
    grpo = grpo_example(
        {"input": user_content(instruction_for(task), cluster), "output": "x", "task_type": f"{task}_mixup"}
    )
    assert sft["prompt"] == grpo["prompt"] == expected
    assert sft["completion"][0]["content"] == format_target("x", "why")
    # inference: the distill stage's budgeted builder, the pipeline (installed) and the saved spec
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    staged, dropped = fit_messages(tok, PAIRS, task, max_prompt_tokens=100_000)
    pipe = pipeline("instruction-distillation", model=tiny_qwen_dir, device="cpu")
    assert dropped == 0 and staged == expected
    assert pipe.messages_for(PAIRS, task) == expected
    assert render_messages(prompt_spec(), PAIRS, task) == expected
    # the text every engine sends through the chat template is the same string
    rendered = tok.apply_chat_template(expected, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n") and expected[0]["content"] in rendered


# -- prompt_style="reference": what a checkpoint trained by the paper's code saw ----------------------
REF_SYSTEM = (
    "You are an expert in data mix-up. Your task is to merge the provided content into a single coherent and "
    "high-quality output.\n"
    "You MUST ALWAYS follow this exact format:\n"
    "1. First, provide your reasoning wrapped in <think> tags\n"
    "2. Then, provide your final answer wrapped in <answer> tags\n"
    "NEVER output anything outside these tags.\n\n"
    "Example format:\n"
    "<think>\n[Your step-by-step reasoning about how and why the merge makes sense]\n</think>\n\n"
    "<answer>\n[The final merged content]\n</answer>"
)
# its GRPO template, character for character: one line, newlines written as backslash + n
REF_GRPO = (
    r"You are an expert in data mix-up. Your task is to merge the provided content into a single coherent and "
    r"high-quality output. You MUST ALWAYS follow this exact format:\n1. First, provide your reasoning wrapped in "
    r"<think> tags\n2. Then, provide your final answer wrapped in <answer> tags\nNEVER output anything outside "
    r"these tags.\n\nExample format:\n<think>\n[Your step-by-step reasoning about how and why the merge makes "
    r"sense]\n</think>\n\n<answer>\n[The final merged content]\n</answer>\n"
)
REF_INSTRUCTION = (
    "Given some related question-answer pairs, merge them into a single coherent question-answer pair that "
    "preserves all essential information from the originals."
)


def test_reference_style_sft_and_inference():
    rec = {"instruction": "Merge these.", "input": "Q: a\nA: b\n\nQ: c\nA: d", "output": "Q: x\nA: y ", "cot": "why"}
    sft = sft_example({**rec, "task_type": "qa"}, style="reference")
    assert sft["prompt"] == [
        {"role": "system", "content": REF_SYSTEM},
        {"role": "user", "content": "Merge these.\nQ: a\nA: b\n\nQ: c\nA: d"},  # one newline after the instruction
    ]
    assert sft["completion"][0]["content"] == "<think>\nwhy\n</think>\n\n<answer>\nQ: x\nA: y\n</answer>"
    # no reasoning: no think block at all (ours always writes one)
    no_cot = sft_example({**rec, "cot": ""}, style="reference")["completion"][0]["content"]
    assert no_cot == "<answer>\nQ: x\nA: y\n</answer>"
    assert format_target("o", "", style="ours").startswith("<think>\n\n</think>")


def test_reference_style_grpo_turn():
    grpo = grpo_example(
        {"input": "Merge these.\n\nQ: a\nA: b", "output": "o", "task_type": "qa_mixup"}, style="reference"
    )
    # a single user turn: no system message, so the chat template's default one applies, as in the reference
    assert grpo["prompt"] == [{"role": "user", "content": REF_GRPO + "Merge these.\n\nQ: a\nA: b"}]
    # an SFT-style record: instruction and input each stripped, then joined by a blank line, as its
    # GRPO split did
    split = grpo_example({"instruction": "Merge.", "input": " Q: a\nA: b ", "output": "o"}, style="reference")
    assert split["prompt"][0]["content"] == REF_GRPO + "Merge.\n\nQ: a\nA: b"


def test_reference_style_edge_cases(tmp_path):
    """The reference's SFT / inference / GRPO-split code on its edge inputs: a whitespace-only
    ``cot`` still opens a think block (its check is truthiness), a record without an instruction is
    the input alone, and the GRPO merge strips both parts before joining them."""
    import json
    from pathlib import Path

    from lmmixup_hf.integrations.mixture import merge_instruction

    rec = {"instruction": "Merge these.", "input": "Q: a\nA: b", "output": "Q: x\nA: y", "task_type": "qa"}
    target = sft_example({**rec, "cot": " \n "}, style="reference")["completion"][0]["content"]
    assert target == "<think>\n\n</think>\n\n<answer>\nQ: x\nA: y\n</answer>"
    for cot in ("", None):
        assert sft_example({**rec, "cot": cot}, style="reference")["completion"][0]["content"].startswith("<answer>")

    # no instruction (absent or blank): the user turn is the input alone, no QA-merge sentence
    for instruction in ({}, {"instruction": "  "}):
        bare = {"input": " Q: a\nA: b ", "output": "o", "task_type": "qa", **instruction}
        assert sft_example(bare, style="reference")["prompt"][1] == {"role": "user", "content": "Q: a\nA: b"}
        # ours keeps the task's instruction
        assert sft_example(bare)["prompt"][1]["content"] == user_content(instruction_for("qa"), "Q: a\nA: b")
        assert grpo_example(bare, style="reference")["prompt"][0]["content"] == REF_GRPO + "Q: a\nA: b"

    # GRPO rows from SFT-format records, in both places that merge them
    padded = {"instruction": "Merge these.  ", "input": "  Q: a", "output": "o", "task_type": "qa"}
    assert grpo_example(padded, style="reference")["prompt"][0]["content"] == REF_GRPO + "Merge these.\n\nQ: a"
    assert merge_instruction("Merge these.  ", "  Q: a") == "Merge these.\n\nQ: a"
    assert merge_instruction(" ", " Q: a ") == "Q: a" and merge_instruction("Merge.", "") == "Merge."

    # the mixture_distill task (inference on MIXTURE test records) follows the same rule
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mixture_utils_edge", Path(__file__).parents[1] / "eval_tasks/mixture/utils.py"
    )
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    (tmp_path / "data_sft" / "qa").mkdir(parents=True)
    records = [{"input": " Q: a\nA: b", "output": "Q: x\nA: y", "cot": " "}]
    (tmp_path / utils.test_file("qa")).write_text(json.dumps(records))
    row = utils.load_mixture("qa", data_dir=str(tmp_path), prompt_style="reference")["test"][0]
    assert row["user"] == "Q: a\nA: b" and row["target"].startswith("<think>\n\n</think>\n\n<answer>")


def test_reference_style_cluster_to_input(tiny_qwen_dir):
    cluster = linearize_cluster(PAIRS, "reference")
    # members "Q: ...\n A: ..." (a space before A:), joined by the four characters \n\n
    assert (
        cluster
        == "Q: when was the riverton bridge built\n A: 1890s i think\\n\\nQ: Riverton bridge made of?\n A: iron"
    )
    assert instruction_for("mcq", "reference") == REF_INSTRUCTION  # one fixed instruction
    expected = build_messages(cluster, "qa", style="reference")
    assert expected == [
        {"role": "system", "content": REF_SYSTEM},
        {"role": "user", "content": f"{REF_INSTRUCTION}\n{cluster}"},
    ]
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    staged, dropped = fit_messages(tok, PAIRS, "qa", max_prompt_tokens=100_000, style="reference")
    assert dropped == 0 and staged == expected  # what the distill stage sends with prompt_style: reference
    with pytest.raises(ValueError, match="prompt_style"):
        build_messages(cluster, "qa", style="paper")


def test_reference_style_mixture_task(monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).parent / "fixtures" / "mixture"
    spec = importlib.util.spec_from_file_location(
        "mixture_utils_style", Path(__file__).parents[1] / "eval_tasks/mixture/utils.py"
    )
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    raw = json.loads((root / "data_sft" / "qa" / "merged_test_qa_noisy.json").read_text())[0]
    monkeypatch.setenv(utils.ENV_STYLE, "reference")
    row = utils.load_mixture("qa", data_dir=str(root))["test"][0]
    assert row["system"] == REF_SYSTEM
    assert row["user"] == f"{raw['instruction'].strip()}\n{raw['input'].strip()}"
    ours = utils.load_mixture("qa", data_dir=str(root), prompt_style="ours")["test"][0]
    assert ours["user"] == user_content(raw["instruction"], raw["input"])
