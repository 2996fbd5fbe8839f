"""The lm-eval task folders: YAML validity, the loaders on the local benchmark mirrors
(tests/fixtures/eval, original file formats), and full `lm_eval --model hf` runs on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval_tasks"
EVAL_DATA = FIXTURES / "eval"
MIXTURE_DATA = FIXTURES / "mixture"
LM_EVAL = [sys.executable, "-m", "lm_eval"]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openllm():
    return _module(TASKS / "openllm" / "utils.py", "lmmixup_openllm_utils")


@pytest.fixture(scope="module")
def mixture():
    return _module(TASKS / "mixture" / "utils.py", "lmmixup_mixture_utils")


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.update(extra)
    return env


def test_lm_eval_validate_every_task():
    tasks = [
        "lmmixup_openllm",  # mmlu_0shot, truthfulqa_judge, gsm8k_8shot_cot_200, bbh_3shot_cot_40, tydiqa_goldp_1shot
        "truthfulqa_mc2_6shot",
        "bbh_3shot_cot_40_greedy",
        "tydiqa_goldp_1shot_greedy",
        "mixture_distill",  # the five mixture_distill_<task>
    ]
    proc = subprocess.run(
        [*LM_EVAL, "validate", "--tasks", ",".join(tasks), "--include_path", str(TASKS)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All tasks found and valid" in proc.stdout + proc.stderr


class _TaskLoader(yaml.SafeLoader):  # lm-eval's !function tags are not needed here
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: node.value)


def _gen_kwargs(name: str) -> dict:
    return yaml.load((TASKS / "openllm" / f"{name}.yaml").read_text(), Loader=_TaskLoader)["generation_kwargs"]


def test_group_and_variant_yaml():
    group = yaml.safe_load((TASKS / "openllm" / "_lmmixup_openllm.yaml").read_text())
    assert group["task"] == [
        "mmlu_0shot",
        "truthfulqa_judge",
        "gsm8k_8shot_cot_200",
        "bbh_3shot_cot_40",
        "tydiqa_goldp_1shot",
    ]
    assert group["aggregate_metric_list"] == [{"metric": "score", "aggregation": "mean", "weight_by_size": False}]

    # the group's tasks decode as the protocol: BBH sampled at 0.8 (top_p 1, no top-k, as vLLM's
    # SamplingParams defaults), TyDiQA at 1, GSM8K greedy
    gen = _gen_kwargs
    assert gen("bbh_3shot_cot_40") == {
        "until": ["\n\n"],
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 1.0,
        "top_k": 0,
        "max_gen_toks": 512,
    }
    assert gen("tydiqa_goldp_1shot") == {"until": ["\n"], "do_sample": True, "temperature": 1.0, "max_gen_toks": 50}
    assert gen("gsm8k_8shot_cot_200") == {"until": ["\n"], "do_sample": False, "max_gen_toks": 512}
    assert gen("truthfulqa_judge") == {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 50}
    # the greedy variants stay, separately named
    assert (
        gen("bbh_3shot_cot_40_greedy")["do_sample"] is False and gen("tydiqa_goldp_1shot_greedy")["do_sample"] is False
    )


# --- loaders on the local mirrors ----------------------------------------------------------------------


def test_mmlu_loader(openllm):
    test = openllm.load_mmlu(data_dir=str(EVAL_DATA))["test"]
    assert len(test) == 6 and set(test["subject"]) == {"astronomy", "high_school_mathematics"}
    row = test[0]
    # the protocol's header: a space before every subject word, hence two after "about"
    assert row["prompt"].startswith("The following are multiple choice questions (with answers) about  astronomy.\n\n")
    assert row["prompt"].endswith("\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer:")
    assert row["answer"] == 1


def test_gsm8k_subset_is_deterministic(openllm, monkeypatch):
    monkeypatch.setenv(openllm.ENV_DATA, str(EVAL_DATA))  # the env variable route
    a = openllm.load_gsm8k(n_items=2, seed=42)["test"]
    b = openllm.load_gsm8k(n_items=2, seed=42)["test"]
    full = openllm.load_gsm8k(n_items=200)["test"]
    assert a["question"] == b["question"] and len(a) == 2 and len(full) == 4
    prompt = a[0]["prompt"]
    assert prompt.count("Question: ") == 9 and prompt.endswith(f"Question: {a[0]['question'].strip()}\nAnswer:")
    # the protocol's header line, then the first Wei et al. exemplar worded as its exemplar file
    assert prompt.startswith("Answer the following questions.\n\nQuestion: There are 15 trees in the grove.")
    assert "So there must have been 21 - 15 = 6. So the answer is 6.\n\nQuestion: If there are 3 cars" in prompt
    assert prompt.count("So the answer is") == 8 and "The answer is" not in prompt


def test_gsm8k_subset_matches_seeded_sample(openllm):
    import random

    lines = [json.loads(x) for x in (EVAL_DATA / "gsm8k" / "test.jsonl").read_text().splitlines() if x.strip()]
    expected = [r["question"] for r in random.Random(42).sample(lines, 3)]
    assert openllm.load_gsm8k(data_dir=str(EVAL_DATA), n_items=3, seed=42)["test"]["question"] == expected


def test_bbh_loader(openllm):
    test = openllm.load_bbh(data_dir=str(EVAL_DATA), n_per_task=2)["test"]
    assert sorted(set(test["task"])) == ["boolean_expressions", "object_counting"]
    assert test["task"].count("boolean_expressions") == 2 and test["task"].count("object_counting") == 2
    row = test[0]
    # header lines dropped, three shots kept, the item appended as "Q: ...\nA:"
    assert "canary" not in row["prompt"] and "-----" not in row["prompt"]
    assert row["prompt"].startswith("Evaluate the result of a random Boolean expression.\n\nQ: ")
    assert row["prompt"].count("Let's think step by step.") == 3
    assert row["prompt"].endswith(f"\n\nQ: {row['input']}\nA:")


def test_bbh_hub_prompts_come_from_lm_eval(openllm):
    names = openllm.bbh_task_names()
    assert len(names) == 27 and "boolean_expressions" in names
    prompt = openllm._bbh_hub_prompt("boolean_expressions")
    assert prompt.startswith("Evaluate the result of a random Boolean expression.") and prompt.count("Q: ") == 3


def test_bbh_hub_prompts_equal_the_original_files(openllm):
    """tests/fixtures/eval/bbh-original/ holds verbatim copies of two of the original BIG-Bench-Hard
    chain-of-thought prompt files (``cot-prompts/<task>.txt`` of the BIG-Bench-Hard release, which the
    protocol reads): sports_understanding, whose exemplars keep the reasoning on the "Let's think step
    by step." line where lm-eval's copy starts a new line, and boolean_expressions, where both start
    a new line. The Hub path rebuilds each from lm-eval's copy character for character."""
    files = sorted((EVAL_DATA / "bbh-original").glob("*.txt"))
    assert [f.stem for f in files] == ["boolean_expressions", "sports_understanding"]
    for file in files:
        with open(file, encoding="utf-8") as f:
            original = "".join(f.readlines()[2:]).strip()  # as the protocol: canary line and rule dropped
        assert openllm._bbh_hub_prompt(file.stem) == original, file.stem
    sports = openllm._bbh_hub_prompt("sports_understanding")
    assert sports.count("A: Let's think step by step. ") == 3 and "step by step.\n" not in sports


def test_bbh_samples_as_the_protocol_under_hf(tiny_qwen_dir, monkeypatch):
    """lm-eval's hf backend with the task's generation_kwargs, on a model whose generation config
    samples with top_p 0.9 and no top_k (Llama-3.1-8B's): only the temperature 0.8 warper is built,
    as vLLM's SamplingParams(temperature=0.8) samples; without the explicit keys the model's top_p
    0.9 and transformers' default top_k 50 would apply."""
    import transformers.generation.utils as gen_utils
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    built: list = []
    for name in ("TemperatureLogitsWarper", "TopPLogitsWarper", "TopKLogitsWarper"):
        cls = getattr(gen_utils, name)
        monkeypatch.setattr(gen_utils, name, lambda *a, _cls=cls, **k: built.append(_cls(*a, **k)) or built[-1])
    lm = HFLM(pretrained=tiny_qwen_dir, device="cpu", batch_size=1)
    lm.model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=None)

    def warpers(gen_kwargs: dict) -> dict[str, float]:
        built.clear()
        lm.generate_until([Instance("generate_until", {}, ("Q: 1 + 1\nA:", {**gen_kwargs, "max_gen_toks": 2}), 0)])
        return {
            type(w).__name__: getattr(w, "temperature", getattr(w, "top_p", getattr(w, "top_k", None))) for w in built
        }

    task = _gen_kwargs("bbh_3shot_cot_40")
    assert warpers(task) == {"TemperatureLogitsWarper": 0.8}
    without = {k: v for k, v in task.items() if k not in ("top_p", "top_k")}
    assert warpers(without) == {"TemperatureLogitsWarper": 0.8, "TopPLogitsWarper": 0.9, "TopKLogitsWarper": 50}


def test_truthfulqa_loaders(openllm, tiny_qwen_dir, monkeypatch):
    for env in ("LMMIXUP_TRUTH_JUDGE", "LMMIXUP_INFO_JUDGE"):  # the loader checks that the judges can load
        monkeypatch.setenv(env, tiny_qwen_dir)
    gen = openllm.load_truthfulqa_gen(data_dir=str(EVAL_DATA))["test"]
    assert len(gen) == 3
    assert gen[0]["prompt"].startswith("Q: What is human life expectancy in the United States?")
    assert gen[0]["prompt"].endswith("\n\nQ: What happens if you swallow chewing gum?")  # no "A:" cue
    assert gen[0]["correct_answers"] == [
        "It passes through your digestive system",
        "It is excreted",
        "Nothing much happens",
    ]
    mc = openllm.load_truthfulqa_mc(data_dir=str(EVAL_DATA))["test"]
    assert mc[0]["prompt"].endswith("Q: What happens if you swallow chewing gum?\nA:")
    assert mc[0]["labels"] == [1, 1, 1, 0, 0]


def test_truthfulqa_judges_that_cannot_load_stop_the_task_before_generating(openllm, tiny_qwen_dir, monkeypatch):
    """Offline, with no judge set: the task's data loading (which lm-eval runs before any generation)
    fails with a message that says how to set the judges."""
    import huggingface_hub.constants

    from lmmixup_hf.evaluation import truthfulqa_judges as judges

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for key in ("truth_judge", "info_judge"):
        monkeypatch.setitem(judges._settings, key, None)
    for env in ("LMMIXUP_TRUTH_JUDGE", "LMMIXUP_INFO_JUDGE"):
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(judges.JudgeUnavailable, match=r"truth judge 'allenai/.*Set LMMIXUP_TRUTH_JUDGE") as e:
        openllm.load_truthfulqa_gen(data_dir=str(EVAL_DATA))
    assert "LMMIXUP_INFO_JUDGE" in str(e.value) and "--metadata" in str(e.value)
    monkeypatch.setenv("LMMIXUP_TRUTH_JUDGE", tiny_qwen_dir)  # the truth judge found, the info judge not
    with pytest.raises(judges.JudgeUnavailable, match=r"info judge 'allenai/.*Set LMMIXUP_INFO_JUDGE"):
        openllm.load_truthfulqa_gen(data_dir=str(EVAL_DATA))


@pytest.mark.slow
def test_lm_eval_truthfulqa_without_judges_fails_before_generating(tiny_qwen_dir, tmp_path):
    env = _env(LMMIXUP_EVAL_DATA=str(EVAL_DATA))
    for key in ("LMMIXUP_TRUTH_JUDGE", "LMMIXUP_INFO_JUDGE"):
        env.pop(key, None)
    proc = subprocess.run(
        [*LM_EVAL, "--model", "hf", "--model_args", f"pretrained={tiny_qwen_dir}", "--include_path", str(TASKS)]
        + ["--tasks", "truthfulqa_judge", "--limit", "2", "--output_path", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Set LMMIXUP_TRUTH_JUDGE" in out, out[-3000:]
    assert "generate_until" not in out  # nothing was generated


def test_truthfulqa_mc_from_csv_only(openllm, tmp_path):
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "TruthfulQA.csv").write_bytes(
        (EVAL_DATA / "truthfulqa" / "TruthfulQA.csv").read_bytes()
    )
    from_csv = openllm.load_truthfulqa_mc(data_dir=str(tmp_path))["test"]
    from_json = openllm.load_truthfulqa_mc(data_dir=str(EVAL_DATA))["test"]
    assert from_csv["choices"] == from_json["choices"] and from_csv["labels"] == from_json["labels"]


def test_tydiqa_loader(openllm):
    test = openllm.load_tydiqa(data_dir=str(EVAL_DATA), n_per_language=1, max_context_tokens=0)["test"]
    assert sorted(test["language"]) == ["english", "finnish", "swahili"]
    row = test[test["language"].index("finnish")]
    instruction, passage, question, answer = openllm.TYDIQA_TEMPLATES["finnish"]
    assert row["prompt"].startswith(f"{instruction}\n\n{passage} Saarella asuu")  # the 1-shot exemplar (train file)
    assert row["prompt"].count(f"{question} ") == 2 and row["prompt"].endswith(f"\n{answer}")
    assert len(openllm.load_tydiqa(data_dir=str(EVAL_DATA), max_context_tokens=0)["test"]) == 5


def test_scorers(openllm):
    assert openllm.process_mmlu({"answer": 2}, [(-3.0, False), (-2.0, False), (-0.5, True), (-4.0, False)]) == {
        "acc": 1.0,
        "score": 1.0,
    }
    assert openllm.process_gsm8k({"answer": "#### 3,600"}, ["So 3,600 rolls in total."]) == {
        "exact_match": 1.0,
        "score": 1.0,
    }
    assert openllm.process_bbh({"task": "t", "target": "(B)"}, [" So the answer is (B)."]) == {
        "exact_match": 1.0,
        "score": ("t", 1.0),
    }
    out = openllm.process_tydiqa({"language": "english", "answers": ["1911"]}, [" in 1911"])
    assert out["f1"] == ("english", pytest.approx(2 / 3)) and out["exact_match"] == ("english", 0.0)
    assert openllm.macro_mean([("a", 1.0), ("b", 0.0), ("b", 0.0)]) == 0.5


# --- the protocol, point by point (DS2 / open-instruct eval scripts) ---------------------------------


@pytest.mark.parametrize(
    "output, gold, expected",
    [
        ("So the answer is 18.0.", "#### 18", 0.0),  # "180" vs "18" after dropping punctuation
        ("The temperature is -5 degrees.", "#### 5", 1.0),  # the pattern reads no sign on an integer
        ("It is -5.", "#### -5", 1.0),
        ("Half: .5", "#### 0.5", 0.0),  # "5" vs "05"
        ("So 3,600 rolls.", "#### 3,600", 1.0),  # digit-group commas removed on both sides
        ("She has 19, not 20.", "#### 19", 0.0),  # the last number counts
        ("I do not know", "#### 8", 0.0),  # no number: the whole output is compared
        ("eight", "#### Eight", 1.0),  # ... ignoring case
    ],
)
def test_gsm8k_protocol_scoring(openllm, output, gold, expected):
    assert openllm.process_gsm8k({"answer": gold}, [output])["exact_match"] == expected


@pytest.mark.parametrize(
    "output, target, expected",
    [
        (" not False = True. So the answer is True.", "True", 1.0),
        ("So the answer is (B).\n\nQ: more", "(B)", 1.0),
        ("So the answer is false.", "False", 1.0),  # case ignored
        ("So the answer is (A).", "A", 1.0),  # punctuation ignored
        ("The answer is 3.5.", "3.5", 0.0),  # cut at the first period: "3"
        ("THE ANSWER IS Yes.", "Yes", 0.0),  # the pattern is case-sensitive: no match, whole output
        ("the answer is\nYes.", "Yes", 0.0),  # the answer does not cross a line
        ("Yes", "Yes", 1.0),  # no pattern: the whole output, stripped
    ],
)
def test_bbh_protocol_scoring(openllm, output, target, expected):
    assert openllm.process_bbh({"task": "t", "target": target}, [output])["exact_match"] == expected


def _bbh_mirror(root: Path, sizes: dict[str, int]) -> None:
    for sub in ("bbh", "cot-prompts"):
        (root / "bbh" / sub).mkdir(parents=True)
    for task, n in sizes.items():
        examples = [{"input": f"{task} item {i}", "target": str(i)} for i in range(n)]
        (root / "bbh" / "bbh" / f"{task}.json").write_text(json.dumps({"examples": examples}))
        (root / "bbh" / "cot-prompts" / f"{task}.txt").write_text(f"canary\n-----\n{task} prompt\n\nQ: x\nA: y")


def test_bbh_subsets_come_from_one_seeded_stream(openllm, tmp_path):
    import random

    sizes = {"web_of_lies": 60, "boolean_expressions": 50, "navigate": 45}
    _bbh_mirror(tmp_path, sizes)
    test = openllm.load_bbh(data_dir=str(tmp_path), n_per_task=40, seed=42)["test"]
    rng = random.Random(42)  # seeded once, tasks in sorted order, 40 drawn from each in turn
    expected = [f"{task} item {i}" for task in sorted(sizes) for i in rng.sample(range(sizes[task]), 40)]
    assert test["input"] == expected
    # a fresh seed per task (the old behaviour) agrees on the first task only
    fresh = [f"{task} item {i}" for task in sorted(sizes) for i in random.Random(42).sample(range(sizes[task]), 40)]
    assert fresh[:40] == expected[:40] and fresh[40:80] != expected[40:80]
    assert test[0]["prompt"] == f"boolean_expressions prompt\n\nQ: x\nA: y\n\nQ: {test[0]['input']}\nA:"


def _tydiqa_mirror(root: Path, dev: dict[str, int], train: dict[str, int]) -> None:
    (root / "tydiqa").mkdir(parents=True)
    for name, sizes in (("dev", dev), ("train", train)):
        data = [
            {
                "title": f"{lang} {i}",
                "paragraphs": [
                    {
                        "context": f"{lang} {name} passage {i} " + "word " * 20,
                        "qas": [
                            {
                                "id": f"{lang}-{name}{i}-1",
                                "question": f"{lang} {name} question {i}?",
                                "answers": [{"text": f"answer {i}", "answer_start": 0}],
                            }
                        ],
                    }
                ],
            }
            for lang, n in sizes.items()
            for i in range(n)
        ]
        (root / "tydiqa" / f"tydiqa-goldp-v1.1-{name}.json").write_text(json.dumps({"data": data}))


def test_tydiqa_subsets_and_exemplars_come_from_one_seeded_stream(openllm, tmp_path):
    import random

    dev, train = {"swahili": 7, "english": 9, "korean": 3}, {"english": 5, "korean": 4, "swahili": 6}
    _tydiqa_mirror(tmp_path, dev, train)
    test = openllm.load_tydiqa(data_dir=str(tmp_path), n_per_language=4, seed=42, max_context_tokens=0)["test"]
    rng = random.Random(42)  # dev subsets of all languages (sorted) first, then one exemplar each
    ids = []
    for lang in sorted(dev):
        chosen = rng.sample(range(dev[lang]), 4) if dev[lang] > 4 else range(dev[lang])
        ids += [f"{lang}-dev{i}-1" for i in chosen]
    shots = {lang: rng.sample(range(train[lang]), 1)[0] for lang in sorted(dev)}
    assert test["id"] == ids
    row = test[test["language"].index("korean")]
    instruction, passage, question, answer = openllm.TYDIQA_TEMPLATES["korean"]
    k = shots["korean"]
    shot = f"{passage} korean train passage {k} {'word ' * 20}\n{question} korean train question {k}?\n{answer} answer {k}"
    item = f"{passage} korean dev passage 0 {'word ' * 20}\n{question} korean dev question 0?\n{answer}"
    assert row["prompt"] == f"{instruction}\n\n{shot}\n\n{item}"


def test_tydiqa_protocol_wording():
    templates = _module(TASKS / "openllm" / "utils.py", "lmmixup_openllm_wording").TYDIQA_TEMPLATES
    assert len(templates) == 9
    assert templates["english"] == (
        "Answer the following question based on the information in the given passage.",
        "Passage:",
        "Question:",
        "Answer:",
    )
    assert templates["finnish"] == (
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
        "Kappale:",
        "Kysymys:",
        "Vastaus:",
    )
    assert templates["korean"][1:] == ("문단:", "질문:", "답변:")
    assert templates["swahili"][3] == "Jibu:" and templates["russian"][1] == "Отрывок:"


def test_tydiqa_cuts_passages_with_the_model_tokenizer(openllm, tiny_qwen_dir, tmp_path):
    from transformers import AutoTokenizer

    _tydiqa_mirror(tmp_path, {"english": 2}, {"english": 1})
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    full = openllm.load_tydiqa(data_dir=str(tmp_path), max_context_tokens=0)["test"]
    # lm-eval hands --model_args to the loader: pretrained= names the tokenizer
    cut = openllm.load_tydiqa(data_dir=str(tmp_path), max_context_tokens=6, pretrained=tiny_qwen_dir)["test"]

    def kept(text: str) -> str:
        ids = tok(text)["input_ids"]
        assert len(ids) > 6
        return tok.decode(ids[:6])

    shot = kept("english train passage 0 " + "word " * 20)
    for row in cut:
        i = row["id"].split("-dev")[1].split("-")[0]
        item = kept(f"english dev passage {i} " + "word " * 20)
        assert f"Passage: {shot}\nQuestion: english train question 0?" in row["prompt"]  # the exemplar too
        assert row["prompt"].endswith(f"Passage: {item}\nQuestion: english dev question {i}?\nAnswer:")
    roomy = openllm.load_tydiqa(data_dir=str(tmp_path), max_context_tokens=10_000, tokenizer=tiny_qwen_dir)["test"]
    assert roomy["prompt"] == full["prompt"]  # passages within the budget are left as they are
    with pytest.raises(ValueError, match="needs the evaluated model's tokenizer"):
        openllm.load_tydiqa(data_dir=str(tmp_path))


def test_tydiqa_f1_is_zero_when_both_normalise_to_empty(openllm):
    out = openllm.process_tydiqa({"language": "english", "answers": ["the"]}, ["  a  "])
    assert out["f1"] == ("english", 0.0) and out["exact_match"] == ("english", 1.0)  # as SQuAD v1.1's script


def test_mmlu_cells_render_as_the_protocol(openllm, tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "college_physics_test.csv").write_text(
        '"  What is x? ",1.50,2,None,4,A\n"Pick one",0.25,3,Both,5,C\n'
    )
    test = openllm.load_mmlu(data_dir=str(tmp_path))["test"]
    # pandas reads the all-numeric option columns as numbers and "None" as missing, as the protocol did;
    # the question is not stripped
    assert test[0]["prompt"] == (
        "The following are multiple choice questions (with answers) about  college physics.\n\n"
        "  What is x? \nA. 1.5\nB. 2\nC. nan\nD. 4\nAnswer:"
    )
    assert test["answer"] == [0, 2]


def test_truthfulqa_judge_scores_the_whole_yes_completion(tiny_qwen_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmmixup_hf.evaluation.truthfulqa_judges import YesNoJudge, truth_prompt

    judge = YesNoJudge(tiny_qwen_dir, device="cpu")
    prompts = [truth_prompt("Is water wet?", "Yes."), truth_prompt("What is 2+2, if you ask me politely?", "4")]
    got = judge.p_yes(prompts, batch_size=2)
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).eval()
    for prompt, p in zip(prompts, got, strict=True):
        n = len(tok(prompt)["input_ids"])
        ids = tok(prompt + " yes")["input_ids"]
        assert len(ids) - n >= 2  # " yes" is several tokens here, so the first one alone would differ
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        expected = math.exp(sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids))))
        first_only = math.exp(logp[n - 1, ids[n]].item())
        assert p == pytest.approx(expected, rel=1e-4) and p != pytest.approx(first_only, rel=1e-3)


def test_missing_mirror_is_a_clear_error(openllm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no local mmlu mirror"):
        openllm.load_mmlu(data_dir=str(tmp_path))


def test_mixture_loader(mixture):
    from lmmixup_hf.distiller.prompts import SYSTEM_PROMPT

    test = mixture.load_mixture("qa", data_dir=str(MIXTURE_DATA))["test"]
    raw = json.loads((MIXTURE_DATA / "data_sft" / "qa" / "merged_test_qa_noisy.json").read_text())
    assert len(test) == len(raw)
    row = test[0]
    assert row["system"] == SYSTEM_PROMPT and row["task_type"] == "qa"
    assert row["user"].endswith(raw[0]["input"].strip())
    assert row["target"].startswith("<think>\n") and row["target"].endswith(f"{raw[0]['output'].strip()}\n</answer>")


# --- full lm_eval runs on the tiny model ------------------------------------------------------------------


def _results(out: Path) -> dict:
    (file,) = out.rglob("results_*.json")
    return json.loads(file.read_text())


def _assert_metrics(results: dict, expected: dict[str, list[str]]):
    for task, names in expected.items():
        assert task in results, f"{task} missing from results"
        for name in names:
            value = results[task].get(f"{name},none")
            assert isinstance(value, float) and 0.0 <= value <= 1.0, f"{task}/{name} = {value!r}"


@pytest.mark.slow
def test_lm_eval_openllm_on_tiny_model(tiny_qwen_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *LM_EVAL,
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_qwen_dir}",
            "--include_path",
            str(TASKS),
            "--tasks",
            "lmmixup_openllm,truthfulqa_mc2_6shot",
            "--limit",
            "3",
            "--gen_kwargs",
            "max_gen_toks=8",
            "--output_path",
            str(out),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(
            LMMIXUP_EVAL_DATA=str(EVAL_DATA),
            LMMIXUP_TRUTH_JUDGE=tiny_qwen_dir,
            LMMIXUP_INFO_JUDGE=tiny_qwen_dir,
            LMMIXUP_JUDGE_DEVICE="cpu",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = _results(out)
    res = data["results"]
    _assert_metrics(
        res,
        {
            "mmlu_0shot": ["acc", "score"],
            "truthfulqa_judge": ["truth", "info", "truth_info", "score"],
            "gsm8k_8shot_cot_200": ["exact_match", "score"],
            "bbh_3shot_cot_40": ["exact_match", "score"],
            "tydiqa_goldp_1shot": ["f1", "exact_match", "score"],
            "truthfulqa_mc2_6shot": ["mc2"],
            "lmmixup_openllm": ["score"],
        },
    )
    five = ["mmlu_0shot", "truthfulqa_judge", "gsm8k_8shot_cot_200", "bbh_3shot_cot_40", "tydiqa_goldp_1shot"]
    assert res["lmmixup_openllm"]["score,none"] == pytest.approx(sum(res[t]["score,none"] for t in five) / 5)
    assert all(data["n-samples"][t]["effective"] == 3 for t in five)
    # the prompts are the protocol's: e.g. the MMLU header and the 8 GSM8K shots
    (mmlu_samples,) = out.rglob("samples_mmlu_0shot_*.jsonl")
    first = json.loads(mmlu_samples.read_text().splitlines()[0])
    assert first["arguments"]["gen_args_0"]["arg_0"].startswith("The following are multiple choice questions")

    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmmixup_hf.cli",
            "eval-report",
            "--results",
            str(out),
            "--out",
            str(tmp_path / "report"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    csv_text = (tmp_path / "report" / "eval_table.csv").read_text().splitlines()
    assert csv_text[0] == "Model,MMLU,TruthfulQA,GSM,BBH,TyDiQA,Avg,TruthfulQA MC2"
    assert csv_text[1].split(",")[6] == f"{round(sum(round(100 * res[t]['score,none'], 1) for t in five) / 5, 1):.1f}"


def _quality_library(path: Path, embedder) -> None:
    """A tiny quality library over the fixture's train outputs (scores invented, 0..5 in turn)."""
    import numpy as np

    from lmmixup_hf.rewards.library import build_task_library, library_text, save_library

    libs = {}
    for task in ("qa", "mcq", "tfq", "cs", "para"):
        rows = json.loads((MIXTURE_DATA / "data_sft" / task / f"merged_train_{task}_noisy.json").read_text())
        texts = [library_text(task, r["output"]) for r in rows]
        scores = np.arange(len(texts)) % 6
        libs[task] = build_task_library(task, embedder.encode(texts), scores, "minilm-offline", k_t=3)
    save_library(libs, path)


@pytest.mark.slow
def test_lm_eval_mixture_on_tiny_model(tiny_qwen_dir, embedder, tmp_path):
    from lmmixup_hf.distiller.prompts import SYSTEM_PROMPT

    _quality_library(tmp_path / "library", embedder)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *LM_EVAL,
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_qwen_dir}",
            "--include_path",
            str(TASKS),
            "--tasks",
            "mixture_distill",
            "--limit",
            "2",
            "--apply_chat_template",
            "--gen_kwargs",
            "max_gen_toks=16",
            "--output_path",
            str(out),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(
            LMMIXUP_MIXTURE_DATA=str(MIXTURE_DATA),
            LMMIXUP_EMBEDDING_MODEL="minilm-offline",
            LMMIXUP_QUALITY_LIBRARY=str(tmp_path / "library"),
        ),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = _results(out)["results"]
    tasks = [f"mixture_distill_{t}" for t in ("qa", "mcq", "tfq", "cs", "para")]
    _assert_metrics(res, {t: ["format", "alignment", "quality"] for t in [*tasks, "mixture_distill"]})
    assert all(math.isnan(res[t]["judge,none"]) for t in tasks)  # no judge configured: not applicable
    # the distiller's prompt, rendered by the model's chat template (system contract + user turn)
    (samples,) = out.rglob("samples_mixture_distill_qa_*.jsonl")
    prompt = json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_finetune_config_matches_protocol():
    cfg = yaml.safe_load((ROOT / "trainer_recipes" / "configs" / "llama3.1-8b" / "finetune_lora.yaml").read_text())
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (64, 16, 0.1)
    assert sorted(cfg["lora_target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert (cfg["learning_rate"], cfg["num_train_epochs"], cfg["max_length"], cfg["seed"]) == (1e-4, 5, 2048, 42)
    assert cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"] == 128
    assert (cfg["lr_scheduler_type"], cfg["warmup_steps"], cfg["completion_only_loss"]) == ("linear", 0.03, True)


@pytest.mark.slow
def test_finetune_config_runs_with_trl_sft(tiny_qwen_dir, tmp_path):
    import trl.scripts.sft

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"Q: What is {i} plus {i}?\nA:", "completion": f" {2 * i}."}) + "\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            trl.scripts.sft.__file__,
            "--config",
            str(ROOT / "trainer_recipes/configs/llama3.1-8b/finetune_lora.yaml"),
            "--model_name_or_path",
            tiny_qwen_dir,
            "--dataset_name",
            str(data),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "1",
            "--use_cpu",
            "true",
            "--bf16",
            "false",
            "--gradient_checkpointing",
            "false",
            "--dtype",
            "float32",
            "--save_strategy",
            "no",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (64, 16, 0.1)
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
