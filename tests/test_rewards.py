"""Rewards on hand-written completions: every task type, reference and strict/smooth modes, None
handling, conversational input, malformed input, pickling, dotted paths and one encode per batch."""

from __future__ import annotations

import importlib
import pickle

import numpy as np
import pytest

from lmmixup_hf.rewards import (
    AlignmentReward,
    FormatReward,
    MixupReward,
    QualityReward,
    RewardConfig,
    alignment_reward,
    format_reward,
    format_score,
    mixup_reward,
    quality_reward,
)
from lmmixup_hf.rewards.common import completion_text, extract_answer
from lmmixup_hf.rewards.config import clear_caches, embedder_for
from lmmixup_hf.rewards.library import build_task_library, save_library
from lmmixup_hf.rewards.mixup import combine


def wrap(answer: str, think: str = "The items overlap; merge them.") -> str:
    return f"<think>\n{think}\n</think>\n\n<answer>\n{answer}\n</answer>"


MCQ = "Q: Which planet is largest?\nA) Mars\nB) Jupiter\nC) Venus\nD) Earth\nAnswer: B"
PARA = (
    "The Riverton Bridge is an iron bridge completed in the 1890s. It was designed by the engineer Hale "
    "and still carries traffic over the river today."
)

# (completion, task_type, reference score, strict score)
FORMAT_TABLE = [
    (wrap("Q: When was it built?\nA: In the 1890s."), "qa_mixup", 1.0, 1.0),
    # the reference's task names are exact MIXTURE keys: "qa" or "QA_mixup" earn no task credit there
    (wrap("Q: When was it built?\nA: In the 1890s."), "qa", 0.5, 1.0),
    (wrap("Q: When was it built?\nA: In the 1890s."), "QA_mixup", 0.5, 1.0),
    (wrap("ok"), "para", 0.5, 0.5),
    ("<answer>\nQ: When?\nA: 1890s.\n</answer>", "qa_mixup", 0.5, 0.0),  # no think block
    (wrap("FAQ: see the Data: section"), "qa_mixup", 1.0, 0.5),  # IGNORECASE finds Q: and a: inside words
    (wrap("Just some text."), "qa_mixup", 0.5, 0.5),
    (wrap("Q: When?\nA: 1890s.") + "\ntrailing text", "qa_mixup", 0.5, 0.0),
    (wrap(MCQ), "mcq_mixup", 1.0, 1.0),
    (wrap(MCQ.replace("Answer: B", "Answer: E")), "mcq_mixup", 1.0, 0.5),  # invalid letter
    (wrap(MCQ.replace("\nD) Earth", "")), "mcq_mixup", 0.5, 0.5),  # no option D
    (wrap("The Sun is a star.\nAnswer: True"), "tfq_mixup", 1.0, 1.0),
    (wrap("The Moon is a planet.\nAnswer: false"), "tfq_mixup", 1.0, 1.0),
    (wrap("The Sun is a star.\nAnswer: Maybe"), "tfq_mixup", 1.0, 0.5),  # not a True/False verdict
    (wrap("C: Infrastructure\nS: The Riverton Bridge is an iron bridge."), "cs_mixup", 1.0, 1.0),
    (wrap("Topic: the basics: yes"), "cs_mixup", 1.0, 0.5),  # "c:" in "Topic:", "s:" in "basics:"
    (wrap("S: statement first\nC: category"), "cs_mixup", 0.5, 0.5),
    (wrap(PARA), "para_mixup", 1.0, 1.0),
    (wrap("ok"), "para_mixup", 1.0, 0.5),  # para scored for free in the reference
    (wrap("Q: What?\nA: " + PARA), "para_mixup", 1.0, 0.5),  # a qa pair is not a paragraph
    ("plain text, no tags", "para_mixup", 0.5, 0.0),
    ("<THINK>x</THINK><ANSWER>Q: a\nA: b</ANSWER>", "qa_mixup", 1.0, 0.0),  # upper-case tags
    (wrap("Q: a\nA: b"), None, 0.5, None),  # unknown task: structure only / does not apply
    (wrap("Q: a\nA: b"), "poetry_mixup", 0.5, None),
    ("<think>a</think><answer></answer>", "qa_mixup", 0.5, 0.0),  # empty answer
    ("<think>a<answer>x</answer></think><answer>Q: a\nA: b</answer>", "qa_mixup", 1.0, 0.0),  # nested tags
]


@pytest.mark.parametrize("text,task,ref,strict", FORMAT_TABLE)
def test_format_table(text, task, ref, strict):
    assert format_score(text, task, "reference") == ref
    assert format_score(text, task, "strict") == strict


def test_format_reward_standard_and_conversational():
    texts = [row[0] for row in FORMAT_TABLE]
    tasks = [row[1] for row in FORMAT_TABLE]
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    ref = FormatReward(RewardConfig(mode="reference"))
    strict = FormatReward(RewardConfig(mode="smooth"))
    assert ref(None, texts, task_type=tasks) == [row[2] for row in FORMAT_TABLE]
    assert ref(None, conversational, task_type=tasks) == [row[2] for row in FORMAT_TABLE]
    assert strict(None, conversational, task_type=tasks) == [row[3] for row in FORMAT_TABLE]


def test_malformed_completions_never_raise():
    bad = [None, 123, [], [{"role": "assistant"}], {"content": 5}, [{"role": "assistant", "content": None}], ""]
    assert [completion_text(c) for c in bad] == [""] * len(bad)
    out = FormatReward(RewardConfig())(None, bad, task_type=["qa"] * len(bad))
    assert out == [0.0] * len(bad)
    assert FormatReward(RewardConfig(mode="smooth"))(None, bad, task_type="qa_mixup") == [0.0] * len(bad)
    assert FormatReward(RewardConfig())(None, ["x"]) == [0.0]  # no task_type column at all


def test_answer_extraction_modes():
    text = "<think>why</think><ANSWER>body</ANSWER>"
    assert extract_answer(text, "reference") == text  # case-sensitive, falls back to the whole response
    assert extract_answer(text, "fixed") == "body"
    assert extract_answer("<think>why</think> tail", "fixed") == "tail"
    assert extract_answer("x <answer> a </answer> <answer>b</answer>", "reference") == "a"


# -- embedding rewards -----------------------------------------------------------------------------
GOOD = [
    "Q: When was the Eiffel Tower completed?\nA: The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "Q: Which planet is the largest in the solar system?\nA: Jupiter is the largest planet in our solar system.",
    "Q: What gas do plants absorb for photosynthesis?\nA: Plants absorb carbon dioxide and release oxygen.",
    "Q: Who wrote the play Hamlet?\nA: William Shakespeare wrote Hamlet around 1600.",
]
POOR = [
    "Q: best pizza topping lol\nA: pineapple obviously!!! buy now cheap",
    "Q: cooking pasta??\nA: just boil it idk, click my link for recipes",
    "Q: fav snack\nA: chips chips chips",
    "Q: how to bake\nA: oven. hot. done lol",
]


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory, minilm_path):
    clear_caches()
    cfg = RewardConfig(embedding_model="minilm-offline")
    emb = embedder_for(cfg).encode(GOOD + POOR)
    lib = build_task_library("qa", emb, np.array([5, 5, 4, 5, 0, 1, 0, 0]), "minilm-offline", k_t=2)
    root = tmp_path_factory.mktemp("library")
    save_library({"qa": lib}, root)
    return str(root), lib


def cfg_for(library_dir, **kw) -> RewardConfig:
    return RewardConfig(embedding_model="minilm-offline", library=library_dir[0], k=3, **kw)


def test_quality_modes(library_dir):
    _, lib = library_dir
    answers = [
        "Q: In what year was the Eiffel Tower in Paris finished?\nA: It was completed in 1889.",
        "Q: good pizza??\nA: pineapple lol, click my link",
    ]
    completions = [wrap(a) for a in answers]
    ref = QualityReward(cfg_for(library_dir))(None, completions, task_type=["qa_mixup"] * 2)
    assert ref == [1.0, 0.0]

    emb = embedder_for(cfg_for(library_dir)).encode(answers)
    post = lib.posterior(emb, k=3)
    E = post @ lib.class_values
    mass = QualityReward(cfg_for(library_dir, mode="smooth"))(None, completions, task_type=["qa"] * 2)
    np.testing.assert_allclose(mass, post[:, lib.class_values >= 4].sum(axis=1), rtol=1e-9)
    assert mass[0] > 0.5 > mass[1]
    linear = QualityReward(cfg_for(library_dir, quality_mode="linear"))(None, completions, task_type=["qa"] * 2)
    np.testing.assert_allclose(linear, np.clip((E - 2) / 3, 0, 1), rtol=1e-9)


def test_quality_missing_library_and_unknown_task(library_dir):
    completions = [wrap(GOOD[0].replace("Paris", "France")), wrap("C: x\nS: y"), wrap(GOOD[1])]
    tasks = [None, "cs_mixup", "qa"]
    # reference: unknown task -> the qa library; a task without a library -> 0.5
    ref = QualityReward(cfg_for(library_dir))(None, completions, task_type=tasks)
    assert ref[0] in (0.0, 1.0) and ref[1] == 0.5 and ref[2] == 1.0
    smooth = QualityReward(cfg_for(library_dir, mode="smooth"))(None, completions, task_type=tasks)
    assert smooth[0] is None and smooth[1] is None and isinstance(smooth[2], float)
    none = QualityReward(RewardConfig(embedding_model="minilm-offline"))(None, completions, task_type=tasks)
    assert none == [None, None, None]


def test_alignment_modes_and_none(library_dir):
    out = "Q: When was the Eiffel Tower completed?\nA: In 1889."
    completions = [wrap(out), wrap("Q: best pizza topping?\nA: pineapple"), wrap(out), wrap(out)]
    outputs = [out, out, None, "   "]
    ref = AlignmentReward(cfg_for(library_dir))(None, completions, output=outputs)
    assert ref == [1.0, 0.0, None, 0.0]  # reference: a blank output is embedded and scored like any other
    cfg = cfg_for(library_dir, mode="smooth")
    smooth = AlignmentReward(cfg)(None, completions, output=outputs)
    e = embedder_for(cfg).encode([out, "Q: best pizza topping?\nA: pineapple"])
    cos = float(e[1] @ e[0])
    assert smooth[0] == pytest.approx(1.0)
    assert smooth[1] == pytest.approx(np.clip((cos - 0.5) / 0.4, 0, 1), abs=1e-6)
    assert smooth[2:] == [None, None]
    assert AlignmentReward(cfg_for(library_dir))(None, [wrap(out)]) == [None]  # no output column


def test_mixup_is_the_weighted_sum_with_one_encode(library_dir):
    clear_caches()
    cfg = cfg_for(library_dir)
    completions = [
        [{"role": "assistant", "content": wrap(GOOD[0])}],
        [{"role": "assistant", "content": wrap(POOR[0])}],
        [{"role": "assistant", "content": "no tags " + GOOD[1]}],
        [{"role": "assistant", "content": wrap(GOOD[3])}],
    ]
    outputs = [GOOD[0], GOOD[0], GOOD[1], None]
    tasks = ["qa_mixup"] * 4
    embedder = embedder_for(cfg)
    before = embedder.n_encoded
    mix = MixupReward(cfg)
    parts = mix.components([completion_text(c) for c in completions], tasks, outputs)
    encoded = embedder.n_encoded - before
    answers = {extract_answer(completion_text(c), "reference") for c in completions}
    assert encoded == len(answers | {o for o in outputs if o})  # answers + references, once
    # quality and alignment on the same batch now come from the memo: no further encoding
    q = QualityReward(cfg)(None, completions, task_type=tasks)
    a = AlignmentReward(cfg)(None, completions, task_type=tasks, output=outputs)
    f = FormatReward(cfg)(None, completions, task_type=tasks)
    assert embedder.n_encoded - before == encoded
    assert (q, a, f) == (parts["quality"], parts["alignment"], parts["format"])
    total = mix(None, completions, task_type=tasks, output=outputs)
    for i in range(3):
        assert total[i] == pytest.approx(0.5 * q[i] + 0.4 * a[i] + 0.1 * f[i])
    assert total[3] == pytest.approx((0.5 * q[3] + 0.1 * f[3]) / 0.6)  # no reference: renormalised
    assert total[0] == pytest.approx(1.0) and total[1] == pytest.approx(0.1)


# -- reference mode, value for value ------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_library(tmp_path_factory, minilm_path):
    """qa: every item scored 5 (quality 1 whatever the answer); mcq: every item 0 (quality 0);
    no cs or para library (the reference gives those 0.5)."""
    clear_caches()
    emb = embedder_for(RewardConfig(embedding_model="minilm-offline")).encode(GOOD + POOR)
    libs = {
        "qa": build_task_library("qa", emb, np.full(8, 5), "minilm-offline", k_t=2),
        "mcq": build_task_library("mcq", emb, np.zeros(8, dtype=int), "minilm-offline", k_t=2),
    }
    root = tmp_path_factory.mktemp("reference-library")
    save_library(libs, root)
    return str(root)


ANS = GOOD[0]
# (completion, task_type, output, hand-computed (quality, alignment, format, mixup)) in reference mode;
# a matching answer and output embed identically (cosine 1 -> alignment 1)
REFERENCE_TABLE = [
    # an exact MIXTURE key: its library, full format credit, weights 0.5/0.4/0.1
    (wrap(ANS), "qa_mixup", ANS, (1.0, 1.0, 1.0, 0.5 + 0.4 + 0.1)),
    # other names: no task credit (format 0.5), the qa library, and the 0.8/0/0.2 fallback weights
    (wrap(ANS), "qa", ANS, (1.0, 1.0, 0.5, 0.8 * 1.0 + 0.0 + 0.2 * 0.5)),
    (wrap(ANS), "QA_mixup", ANS, (1.0, 1.0, 0.5, 0.9)),
    (wrap(ANS), None, ANS, (1.0, 1.0, 0.5, 0.9)),
    (wrap(ANS), "mcq", ANS, (1.0, 1.0, 0.5, 0.9)),  # "mcq" is not "mcq_mixup": the qa library scores it
    (wrap(MCQ), "mcq_mixup", MCQ, (0.0, 1.0, 1.0, 0.5 * 0.0 + 0.4 * 1.0 + 0.1 * 1.0)),
    # a key without a library: quality 0.5; the cs pattern is absent: format 0.5
    (wrap(ANS), "cs_mixup", ANS, (0.5, 1.0, 0.5, 0.5 * 0.5 + 0.4 + 0.1 * 0.5)),
    (wrap("ok"), "para_mixup", "ok", (0.5, 1.0, 1.0, 0.25 + 0.4 + 0.1)),  # para: task half for free
    (wrap("ok"), "para", "ok", (1.0, 1.0, 0.5, 0.8 + 0.2 * 0.5)),
    # an empty or blank target is embedded and scored (cosine far below 0.8 -> 0), not skipped
    (wrap(ANS), "qa_mixup", "", (1.0, 0.0, 1.0, 0.5 + 0.0 + 0.1)),
    (wrap(ANS), "qa_mixup", "   ", (1.0, 0.0, 1.0, 0.6)),
    # no output at all: alignment does not apply, the other weights renormalised
    (wrap(ANS), "qa_mixup", None, (1.0, None, 1.0, (0.5 + 0.1) / 0.6)),
]


def test_reference_mode_value_for_value(reference_library):
    cfg = RewardConfig(mode="reference", embedding_model="minilm-offline", library=reference_library, k=3)
    texts = [row[0] for row in REFERENCE_TABLE]
    tasks = [row[1] for row in REFERENCE_TABLE]
    outputs = [row[2] for row in REFERENCE_TABLE]
    parts = MixupReward(cfg).components(texts, tasks, outputs)
    total = MixupReward(cfg)(None, texts, task_type=tasks, output=outputs)
    for i, (_, task, output, (q, a, f, overall)) in enumerate(REFERENCE_TABLE):
        got = (parts["quality"][i], parts["alignment"][i], parts["format"][i])
        assert got == pytest.approx((q, a, f)), (task, output, got)
        assert total[i] == pytest.approx(overall), (task, output, total[i])
    # the smooth mode keeps the lenient names and skips empty targets
    smooth = RewardConfig(mode="smooth", embedding_model="minilm-offline", library=reference_library, k=3)
    s = MixupReward(smooth).components(texts, tasks, outputs)
    assert s["format"][1] == 1.0 and s["alignment"][9] is None and s["alignment"][10] is None
    assert s["quality"][4] < 0.5  # "mcq" reads as mcq: the all-0 library


def test_only_mixup_reward_reproduces_the_fallback_weights(reference_library):
    """The reference weights a task type outside the five ``*_mixup`` keys 0.8/0/0.2. ``mixup_reward``
    does; the three-function recipe cannot: TRL sums quality_reward, alignment_reward and
    format_reward with one global ``reward_weights`` (0.5/0.4/0.1), a weighted nansum over the
    functions, whatever the row's task type. On the exact keys the two totals agree."""
    cfg = RewardConfig(mode="reference", embedding_model="minilm-offline", library=reference_library, k=3)
    completions = [wrap(ANS)] * 2
    kw = {"task_type": ["qa_mixup", "qa"], "output": ["", ""]}  # an empty target: alignment 0
    parts = np.array(
        [fn(None, completions, **kw) for fn in (QualityReward(cfg), AlignmentReward(cfg), FormatReward(cfg))],
        dtype=float,
    )
    np.testing.assert_allclose(parts.T, [[1.0, 0.0, 1.0], [1.0, 0.0, 0.5]])  # (quality, alignment, format)
    recipe = np.nansum(parts.T * np.array([0.5, 0.4, 0.1]), axis=1)  # as GRPOTrainer combines them
    exact = MixupReward(cfg)(None, completions, **kw)
    assert exact[0] == pytest.approx(recipe[0]) == pytest.approx(0.5 * 1.0 + 0.4 * 0.0 + 0.1 * 1.0)
    assert exact[1] == pytest.approx(0.8 * 1.0 + 0.0 * 0.0 + 0.2 * 0.5)  # the reference's fallback
    assert recipe[1] == pytest.approx(0.5 * 1.0 + 0.4 * 0.0 + 0.1 * 0.5)  # 0.55, not the reference's 0.9


def test_combine_handles_none():
    assert combine([[1.0, None, None], [0.0, None, 1.0], [0.5, None, None]], (0.5, 0.4, 0.1)) == [
        pytest.approx(0.55),
        None,
        pytest.approx(1.0),
    ]


def test_module_functions_by_dotted_path_and_env(library_dir, monkeypatch):
    monkeypatch.setenv("LMMIXUP_EMBEDDING_MODEL", "minilm-offline")
    monkeypatch.setenv("LMMIXUP_QUALITY_LIBRARY", library_dir[0])
    monkeypatch.setenv("LMMIXUP_QUALITY_K", "3")
    monkeypatch.setenv("LMMIXUP_REWARD_MODE", "reference")
    completions = [wrap(GOOD[0])]
    kw = {"task_type": ["qa_mixup"], "output": [GOOD[0]]}
    for name in ("format_reward", "alignment_reward", "quality_reward", "mixup_reward"):
        module, _, attr = f"lmmixup_hf.rewards.{name}".rpartition(".")
        fn = getattr(importlib.import_module(module), attr)
        assert fn.__name__ == name
        assert fn(prompts=["p"], completions=completions, completion_ids=[[1]], trainer_state=None, **kw) == [1.0]
        assert pickle.loads(pickle.dumps(fn)) is fn
    monkeypatch.setenv("LMMIXUP_REWARD_MODE", "smooth")
    assert format_reward(None, [wrap("ok")], task_type=["para"]) == [0.5]
    assert quality_reward(None, [wrap(GOOD[0])], task_type=[None]) == [None]
    assert alignment_reward(None, [wrap(GOOD[0])], output=[GOOD[0]]) == [pytest.approx(1.0)]
    assert mixup_reward(None, [wrap(GOOD[0])], task_type=["qa"], output=[GOOD[0]])[0] > 0.9


def test_instances_pickle_with_names(library_dir):
    cfg = cfg_for(library_dir, mode="smooth", weights=(0.6, 0.3, 0.1))
    for cls, name in [
        (FormatReward, "format_reward"),
        (QualityReward, "quality_reward"),
        (AlignmentReward, "alignment_reward"),
        (MixupReward, "mixup_reward"),
    ]:
        r = pickle.loads(pickle.dumps(cls(cfg)))
        assert r.__name__ == name and r.config == cfg
    named = MixupReward(cfg, name="mixup_smooth", weights=(1.0, 0.0, 0.0))
    assert named.__name__ == "mixup_smooth" and named.config.weights == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        RewardConfig(mode="fancy")
