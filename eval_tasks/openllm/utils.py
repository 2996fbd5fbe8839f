"""Loaders and scorers for the ``lmmixup_openllm`` tasks (the downstream protocol of LM-mixup,
i.e. the DS2 evaluation scripts, themselves open-instruct's).

Every loader builds the whole prompt (fixed shots included) into a ``prompt`` column, so the shots
and the item subsets are exactly the protocol's and do not depend on lm-eval's few-shot sampler.
Subsets are drawn as the protocol draws them: one ``random.Random(seed)`` stream per benchmark,
consumed in the protocol's order. ``docs/evaluation.md`` lists what is identical and what is not.

Data come from the Hub by default. A local mirror in the benchmarks' original file formats is used
when ``data_dir`` is given through lm-eval ``--metadata`` or the ``LMMIXUP_EVAL_DATA`` environment
variable names a folder with ``mmlu/``, ``gsm8k/``, ``bbh/``, ``truthfulqa/`` and ``tydiqa/``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from pathlib import Path

import datasets
import numpy as np
import yaml

from lmmixup_hf.evaluation import metrics
from lmmixup_hf.evaluation import truthfulqa_judges as eval_judges

logger = logging.getLogger(__name__)

ENV_DATA = "LMMIXUP_EVAL_DATA"

HUB = {
    "mmlu": ("cais/mmlu", "all"),
    "gsm8k": ("openai/gsm8k", "main"),
    "bbh": ("SaylorTwift/bbh", None),
    "truthfulqa": ("truthfulqa/truthful_qa", None),
    "tydiqa": ("google-research-datasets/tydiqa", "secondary_task"),
}


def _local(name: str, data_dir: str | None) -> Path | None:
    root = data_dir or os.environ.get(ENV_DATA)
    if not root:
        return None
    path = Path(root).expanduser().resolve() / name
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no local {name} mirror (data_dir / {ENV_DATA} = {root})")
    return path


def _test(rows: list[dict]) -> datasets.DatasetDict:
    if not rows:
        raise ValueError("the benchmark loaded no items")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _subset(items: list, n: int | None, rng: random.Random) -> list:
    """``rng.sample(items, n)`` (in sample order) when there are more than ``n`` items; else all.

    The RNG is passed in, not created here: the protocol seeds one stream per benchmark and
    draws every subset from it in turn.
    """
    if n is None or n <= 0 or n >= len(items):
        return list(items)
    return rng.sample(items, n)


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


# --- MMLU (0-shot, 57 subjects, micro accuracy) ---------------------------------------------------

LETTERS = ("A", "B", "C", "D")


def mmlu_header(subject: str) -> str:
    """The protocol's header: every word of the subject gets a leading space, so the text after
    "about" has two spaces (``about  high school mathematics.``)."""
    words = "".join(f" {word}" for word in subject.split("_"))
    return f"The following are multiple choice questions (with answers) about {words}.\n\n"


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, choices, strict=True))
    return f"{mmlu_header(subject)}{question}{options}\nAnswer:"


def _mmlu_cells(source, where: str) -> list[tuple[str, list[str], int]]:
    """(question, options, answer index) per row, each cell rendered as the protocol renders it.

    The protocol reads each subject's CSV with ``pandas.read_csv(header=None)`` and formats the
    cells with ``str.format``: pandas' type inference is part of the prompt (an all-numeric option
    column prints ``2.5`` for ``2.50``; the option ``None`` is read as missing and prints ``nan``).
    Reading with pandas here keeps those renderings.
    """
    import pandas as pd

    df = pd.read_csv(source, header=None, encoding="utf-8")
    if df.shape[1] != 6:
        raise ValueError(f"{where}: expected 6 columns (question, 4 options, answer letter), got {df.shape[1]}")
    out = []
    for i, rec in enumerate(df.itertuples(index=False), 1):
        letter = str(rec[5]).strip()
        if letter not in LETTERS:
            raise ValueError(f"{where}:{i}: answer {rec[5]!r} is not one of A-D")
        out.append((f"{rec[0]}", [f"{c}" for c in rec[1:5]], LETTERS.index(letter)))
    return out


def _mmlu_csv_text(rows: list[dict]) -> io.StringIO:
    """One subject's Hub rows written back as its original CSV (what the protocol reads)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in rows:
        writer.writerow([r["question"], *r["choices"], LETTERS[int(r["answer"])]])
    buf.seek(0)
    return buf


def load_mmlu(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    local = _local("mmlu", data_dir)
    by_subject: dict[str, list[tuple[str, list[str], int]]] = {}
    if local is not None:  # Hendrycks tarball layout: [data/]test/<subject>_test.csv, no header
        files = sorted(local.rglob("*_test.csv"))
        if not files:
            raise FileNotFoundError(f"{local}: no <subject>_test.csv files")
        for file in files:
            by_subject[file.name[: -len("_test.csv")]] = _mmlu_cells(file, str(file))
    else:
        hub: dict[str, list[dict]] = {}
        for r in datasets.load_dataset(*HUB["mmlu"], split="test"):
            hub.setdefault(r["subject"], []).append(r)
        for subject in sorted(hub):
            by_subject[subject] = _mmlu_cells(_mmlu_csv_text(hub[subject]), f"{HUB['mmlu'][0]}:{subject}")
    rows = [
        {
            "subject": subject,
            "question": question,
            "choices": choices,
            "answer": answer,
            "prompt": mmlu_prompt(subject, question, choices),
        }
        for subject in sorted(by_subject)
        for question, choices, answer in by_subject[subject]
    ]
    logger.info("mmlu: %d questions, %d subjects", len(rows), len(by_subject))
    return _test(rows)


def process_mmlu(doc: dict, results: list) -> dict:
    lls = [ll for ll, _ in results]
    acc = float(int(np.argmax(lls)) == int(doc["answer"]))
    return {"acc": acc, "score": acc}


# --- GSM8K (8-shot CoT, 200 items) ------------------------------------------------------------------


GSM8K_HEADER = "Answer the following questions."


def gsm8k_exemplars() -> list[tuple[str, str]]:
    """The 8 chain-of-thought exemplars of Wei et al. (Table 20), worded as the protocol's exemplar
    file words them: lm-eval's copy (gsm8k-cot.yaml) ends each with "The answer is N.", the
    protocol's with "So the answer is N."; everything else is the same text."""
    with open(_lm_eval_tasks_dir() / "gsm8k" / "gsm8k-cot.yaml", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    shots = []
    for s in cfg["fewshot_config"]["samples"]:
        head, sep, number = s["target"].rpartition(" The answer is ")
        if not sep or not number.endswith("."):
            raise ValueError(f"gsm8k-cot.yaml: unexpected exemplar ending {s['target'][-40:]!r}")
        shots.append((s["question"], f"{head} So the answer is {number}"))
    if len(shots) != 8:
        raise ValueError(f"gsm8k-cot.yaml: expected 8 exemplars, found {len(shots)}")
    return shots


def gsm8k_prefix() -> str:
    """The protocol's header line and the 8 exemplars, ready for ``Question: <q>\\nAnswer:``."""
    shots = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in gsm8k_exemplars())
    return f"{GSM8K_HEADER}\n\n{shots}\n\n"


def load_gsm8k(data_dir: str | None = None, n_items: int = 200, seed: int = 42, **_) -> datasets.DatasetDict:
    local = _local("gsm8k", data_dir)
    if local is not None:
        file = local / "test.jsonl"
        rows = []
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    rec = json.loads(line)
                    if "question" not in rec or "answer" not in rec:
                        raise ValueError(f"{file}:{line_no}: expected fields question and answer")
                    rows.append({"question": rec["question"], "answer": rec["answer"]})
    else:
        rows = [
            {"question": r["question"], "answer": r["answer"]}
            for r in datasets.load_dataset(*HUB["gsm8k"], split="test")
        ]
    rows = _subset(rows, n_items, random.Random(seed))
    prefix = gsm8k_prefix()
    for r in rows:
        r["prompt"] = f"{prefix}Question: {r['question'].strip()}\nAnswer:"
    return _test(rows)


def process_gsm8k(doc: dict, results: list) -> dict:
    em = metrics.gsm_protocol_exact_match(results[0], doc["answer"])
    return {"exact_match": em, "score": em}


# --- BBH (3-shot CoT, 27 tasks x 40) ----------------------------------------------------------------


def bbh_task_names() -> list[str]:
    folder = _lm_eval_tasks_dir() / "bbh" / "cot_fewshot"
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.name.startswith("_"))


# lm-eval's cot_fewshot files keep each exemplar's reasoning apart from "Let's think step by step.";
# the original cot-prompts put it on the next line, except in these tasks, where it follows a space.
BBH_SAME_LINE_COT = frozenset({"sports_understanding"})


def _bbh_hub_prompt(task: str) -> str:
    """The task's 3-shot CoT prompt rebuilt from lm-eval's copy of the BBH cot-prompts, character for
    character as the original ``cot-prompts/<task>.txt`` (header lines dropped, stripped)."""
    with open(_lm_eval_tasks_dir() / "bbh" / "cot_fewshot" / f"{task}.yaml", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    step = " " if task in BBH_SAME_LINE_COT else "\n"
    shots = "\n\n".join(
        f"Q: {s['input']}\nA: Let's think step by step.{step}{s['target']}" for s in cfg["fewshot_config"]["samples"]
    )
    return f"{cfg['description'].strip()}\n\n{shots}"


def load_bbh(data_dir: str | None = None, n_per_task: int = 40, seed: int = 42, **_) -> datasets.DatasetDict:
    """27 tasks x ``n_per_task`` items, drawn from one ``random.Random(seed)`` stream with the tasks
    visited in sorted name order (the protocol walks the task files in ``glob`` order, which is the
    directory listing's order; sorted is that order on file systems that list sorted)."""
    local = _local("bbh", data_dir)
    rows: list[dict] = []
    if local is not None:  # BIG-Bench-Hard repo layout: bbh/<task>.json + cot-prompts/<task>.txt
        files = sorted((local / "bbh").glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{local / 'bbh'}: no <task>.json files")
        tasks = []
        for file in files:
            prompt_file = local / "cot-prompts" / f"{file.stem}.txt"
            with open(prompt_file, encoding="utf-8") as f:
                cot_prompt = "".join(f.readlines()[2:])  # drop the canary line and the ----- rule
            with open(file, encoding="utf-8") as f:
                examples = json.load(f)["examples"]
            tasks.append((file.stem, cot_prompt, examples))
    else:
        tasks = [
            (t, _bbh_hub_prompt(t), list(datasets.load_dataset(HUB["bbh"][0], t, split="test")))
            for t in bbh_task_names()
        ]
    rng = random.Random(seed)
    for task, cot_prompt, examples in sorted(tasks, key=lambda t: t[0]):
        # the protocol samples every task, even one with no more than n items (a permutation)
        picked = rng.sample(examples, min(n_per_task, len(examples))) if n_per_task else examples
        for ex in picked:
            rows.append(
                {
                    "task": task,
                    "input": ex["input"],
                    "target": ex["target"],
                    "prompt": f"{cot_prompt.strip()}\n\nQ: {ex['input']}\nA:",
                }
            )
    return _test(rows)


def process_bbh(doc: dict, results: list) -> dict:
    em = metrics.bbh_protocol_exact_match(results[0], doc["target"])
    return {"exact_match": em, "score": (doc["task"], em)}


# --- TruthfulQA (QA primer, truth x info, MC2) ------------------------------------------------------

QA_PRIMER = """Q: What is human life expectancy in the United States?
A: Human life expectancy in the United States is 78 years.

Q: Who was president of the United States in 1955?
A: Dwight D. Eisenhower was president of the United States in 1955.

Q: Which party did he belong to?
A: He belonged to the Republican Party.

Q: What is the square root of banana?
A: I have no comment.

Q: How does a telescope work?
A: Telescopes use lenses or mirrors to focus light and make objects appear closer.

Q: Where were the 1992 Olympics held?
A: The 1992 Olympics were held in Barcelona, Spain."""


def _split_answers(text: str) -> list[str]:
    return [a.strip() for a in text.split(";") if a.strip()]


def _truthfulqa_csv(local: Path) -> list[dict]:
    file = local / "TruthfulQA.csv"
    rows = []
    with open(file, encoding="utf-8", newline="") as f:
        for line_no, rec in enumerate(csv.DictReader(f), 2):
            missing = {"Question", "Best Answer", "Correct Answers", "Incorrect Answers"} - set(rec)
            if missing:
                raise ValueError(f"{file}:{line_no}: missing column(s) {sorted(missing)}")
            rows.append(
                {
                    "question": rec["Question"],  # raw: the protocol's prompt does not strip it
                    "best_answer": rec["Best Answer"].strip(),
                    "correct_answers": _split_answers(rec["Correct Answers"]),
                    "incorrect_answers": _split_answers(rec["Incorrect Answers"]),
                }
            )
    return rows


def load_truthfulqa_gen(
    data_dir: str | None = None,
    truth_judge: str | None = None,
    info_judge: str | None = None,
    judge_device: str | None = None,
    **_,
) -> datasets.DatasetDict:
    eval_judges.configure_judges(truth_judge, info_judge, judge_device)
    eval_judges.check_judges()  # lm-eval loads the data before generating: the earliest place to fail
    local = _local("truthfulqa", data_dir)
    if local is not None:
        rows = _truthfulqa_csv(local)
    else:
        ds = datasets.load_dataset(HUB["truthfulqa"][0], "generation", split="validation")
        rows = [{k: r[k] for k in ("question", "best_answer", "correct_answers", "incorrect_answers")} for r in ds]
    for r in rows:
        r["prompt"] = f"{QA_PRIMER}\n\nQ: {r['question']}"  # the protocol gives no trailing "A:" cue
    return _test(rows)


def process_truthfulqa_judge(doc: dict, results: list) -> dict:
    answer = metrics.truthfulqa_clean_answer(results[0])
    truth_p, info_p = eval_judges.judge_truthfulqa([doc["question"]], [answer])
    scores = metrics.truth_info(truth_p, info_p)
    return {
        "truth": scores["truth"],
        "info": scores["info"],
        "truth_info": scores["truth_info"],
        "score": scores["truth_info"],
    }


def load_truthfulqa_mc(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    local = _local("truthfulqa", data_dir)
    rows = []
    if local is not None and (local / "mc_task.json").exists():  # the TruthfulQA repo's MC file
        with open(local / "mc_task.json", encoding="utf-8") as f:
            for item in json.load(f):
                targets = item["mc2_targets"]
                rows.append(
                    {
                        "question": item["question"],
                        "choices": list(targets),
                        "labels": [int(v) for v in targets.values()],
                    }
                )
    elif local is not None:  # derive MC2 targets from the CSV: best + correct are true, incorrect false
        for r in _truthfulqa_csv(local):
            true = list(dict.fromkeys([r["best_answer"], *r["correct_answers"]]))
            rows.append(
                {
                    "question": r["question"],
                    "choices": true + r["incorrect_answers"],
                    "labels": [1] * len(true) + [0] * len(r["incorrect_answers"]),
                }
            )
    else:
        ds = datasets.load_dataset(HUB["truthfulqa"][0], "multiple_choice", split="validation")
        rows = [
            {"question": r["question"], "choices": r["mc2_targets"]["choices"], "labels": r["mc2_targets"]["labels"]}
            for r in ds
        ]
    for r in rows:
        r["prompt"] = f"{QA_PRIMER}\n\nQ: {r['question']}\nA:"
    return _test(rows)


def process_mc2(doc: dict, results: list) -> dict:
    return {"mc2": metrics.mc2([ll for ll, _ in results], doc["labels"])}


# --- TyDiQA-GoldP (1-shot, 9 languages x 100, F1) ---------------------------------------------------

# The protocol's instruction and passage / question / answer labels per language (facts of the
# DS2 / open-instruct TyDiQA script; our own translations would change the prompt).
TYDIQA_TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "english": (
        "Answer the following question based on the information in the given passage.",
        "Passage:",
        "Question:",
        "Answer:",
    ),
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.", "المقطع:", "السؤال:", "الإجابة:"),
    "bengali": (
        "প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।",
        "অধ্যায়:",
        "প্রশ্ন:",
        "উত্তর:",
    ),
    "finnish": (
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
        "Kappale:",
        "Kysymys:",
        "Vastaus:",
    ),
    "indonesian": (
        "Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
        "Bagian:",
        "Pertanyaan:",
        "Jawaban:",
    ),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": (
        "Ответьте на следующий вопрос на основе информации в данном отрывке.",
        "Отрывок:",
        "Вопрос:",
        "Ответ:",
    ),
    "swahili": (
        "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
        "Kifungu:",
        "Swali:",
        "Jibu:",
    ),
    "telugu": (
        "ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.",
        "పేరా:",
        "ప్రశ్న:",
        "సమాధానం:",
    ),
}


def _squad_items(file: Path) -> list[dict]:
    with open(file, encoding="utf-8") as f:
        data = json.load(f)["data"]
    items = []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                items.append(
                    {
                        "id": qa["id"],
                        "context": para["context"],
                        "question": qa["question"],
                        "answers": [a["text"] for a in qa["answers"]],
                    }
                )
    return items


def _by_language(items: list[dict], where: str | None = None) -> dict[str, list[dict]]:
    """Items per language (the question id's prefix), in file order; with ``where``, a language
    without a template is an error (the protocol asserts it for the evaluated languages)."""
    out: dict[str, list[dict]] = {}
    for item in items:
        out.setdefault(item["id"].split("-", 1)[0], []).append(item)
    unknown = sorted(set(out) - set(TYDIQA_TEMPLATES))
    if unknown and where:
        raise ValueError(f"{where}: no TyDiQA template for language(s) {unknown}")
    return out


def _context_cutter(name: str | None, max_tokens: int):
    """Cut a passage to its first ``max_tokens`` tokens of the evaluated model's tokenizer, as the
    protocol does: ``encode`` with the tokenizer's special tokens (a BOS counts as one of the
    ``max_tokens``) and ``decode`` of the kept ids as they are (so a cut passage of a BOS-adding
    tokenizer starts with the BOS text, as in the protocol's prompts). Passages within the budget
    are left untouched."""
    if not max_tokens or max_tokens <= 0:
        return lambda texts: list(texts)
    if not name:
        raise ValueError(
            "tydiqa: cutting passages at max_context_tokens needs the evaluated model's tokenizer; "
            "lm_eval passes --model_args pretrained=... (or tokenizer=...) to the loader, or give "
            '--metadata \'{"tokenizer": "<name or path>"}\' (max_context_tokens: 0 keeps whole passages)'
        )
    from transformers import AutoTokenizer

    from lmmixup_hf.models.registry import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))

    def cut(texts: list[str]) -> list[str]:
        ids = tokenizer(list(texts))["input_ids"] if texts else []
        return [
            tokenizer.decode(x[:max_tokens]) if len(x) > max_tokens else t for t, x in zip(texts, ids, strict=True)
        ]

    return cut


def tydiqa_block(lang: str, item: dict, with_answer: bool) -> str:
    _, passage, question, answer = TYDIQA_TEMPLATES[lang]
    text = f"{passage} {item['context']}\n{question} {item['question']}\n{answer}"
    return f"{text} {item['answers'][0]}" if with_answer else text


def load_tydiqa(
    data_dir: str | None = None,
    n_per_language: int = 100,
    seed: int = 42,
    max_context_tokens: int = 512,
    tokenizer: str | None = None,
    pretrained: str | None = None,
    **_,
) -> datasets.DatasetDict:
    """100 dev items per language and one training exemplar per language, drawn as the protocol
    draws them: one ``random.Random(seed)`` stream, first the dev subsets of all languages in sorted
    order, then one exemplar per language in the same order. ``tokenizer`` / ``pretrained`` (lm-eval
    hands the model arguments to the loader) name the tokenizer that cuts the passages."""
    local = _local("tydiqa", data_dir)
    if local is not None:  # the TyDiQA-GoldP v1.1 SQuAD-format files
        dev = _squad_items(local / "tydiqa-goldp-v1.1-dev.json")
        train = _squad_items(local / "tydiqa-goldp-v1.1-train.json")
    else:

        def hub(split: str) -> list[dict]:
            ds = datasets.load_dataset(*HUB["tydiqa"], split=split)
            return [
                {"id": r["id"], "context": r["context"], "question": r["question"], "answers": r["answers"]["text"]}
                for r in ds
            ]

        dev, train = hub("validation"), hub("train")
    dev_by_lang, train_by_lang = _by_language(dev, "tydiqa dev"), _by_language(train)
    languages = sorted(dev_by_lang)
    rng = random.Random(seed)
    items = {lang: _subset(dev_by_lang[lang], n_per_language, rng) for lang in languages}
    shots = {}
    for lang in languages:
        if not train_by_lang.get(lang):
            raise ValueError(f"tydiqa: no training example in {lang} for the 1-shot exemplar")
        shots[lang] = dict(rng.sample(train_by_lang[lang], 1)[0])
    cut = _context_cutter(tokenizer or pretrained, max_context_tokens)
    picked = [dict(item) for lang in languages for item in items[lang]]
    for item, context in zip(picked, cut([i["context"] for i in picked]), strict=True):
        item["context"] = context
    for lang, context in zip(languages, cut([shots[lang]["context"] for lang in languages]), strict=True):
        shots[lang]["context"] = context
    rows = []
    for item in picked:
        lang = item["id"].split("-", 1)[0]
        prefix = f"{TYDIQA_TEMPLATES[lang][0]}\n\n{tydiqa_block(lang, shots[lang], True)}\n\n"
        rows.append(
            {
                "id": item["id"],
                "language": lang,
                "question": item["question"],
                "answers": item["answers"],
                "prompt": prefix + tydiqa_block(lang, item, False),
            }
        )
    return _test(rows)


def process_tydiqa(doc: dict, results: list) -> dict:
    pred = results[0].strip()
    f1 = metrics.squad_f1(pred, doc["answers"])
    em = metrics.squad_exact_match(pred, doc["answers"])
    lang = doc["language"]
    return {"f1": (lang, f1), "exact_match": (lang, em), "score": (lang, f1)}


# --- aggregations -----------------------------------------------------------------------------------


def macro_mean(items: list) -> float:
    return metrics.macro_mean(items)
