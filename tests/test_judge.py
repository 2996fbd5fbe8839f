"""Rubric prompts, tolerant parsing, G-Eval expected scores, the OpenAI and local judges, the reward."""

from __future__ import annotations

import asyncio
import json
import pickle
import re

import pytest
from openai_server import (
    Faults,
    json_tokens,
    judge_responder,
    last_user_text,
    scripted_overall,
    server_factory,
    token_logprobs,
)

from lmmixup_hf.data.schema import compress_score
from lmmixup_hf.judge.judges import (
    KINDS,
    RUBRICS,
    JudgeItem,
    LocalJudge,
    OpenAIJudge,
    Rating,
    ReplyParseError,
    build_judge_messages,
    expected_score,
    parse_reply,
    parse_reply_reference,
    reference_kind,
)

_openai_server = pytest.fixture(server_factory, name="openai_server")

KEY = "sk-test-judge-secret-777"


# -- prompts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_rubric_per_kind(kind):
    system, user = build_judge_messages(JudgeItem("Q: What is 2+2?\nA: 4", kind))
    assert system["role"] == "system" and user["role"] == "user"
    header = RUBRICS[kind][1]
    assert f"### {header}\nQ: What is 2+2?\nA: 4" in user["content"]
    for dim in ("rarity", "complexity", "informativeness", "overall"):
        assert dim in user["content"]
    assert "Reference" not in user["content"]  # reference-free by default


def test_reference_aware_prompt():
    _, user = build_judge_messages(JudgeItem("A: 5", "qa", reference="A: 4"))
    assert user["content"].rstrip().endswith("### Reference\nA: 4")
    with pytest.raises(ValueError, match="unknown rubric"):
        build_judge_messages(JudgeItem("x", "poem"))


# -- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            '{"rarity": 3, "complexity": 4, "informativeness": 5, "overall": 6}',
            {"rarity": 3, "complexity": 4, "informativeness": 5, "overall": 6},
        ),
        (
            '```json\n{"Rarity": 2, "Complexity": 2, "Informativeness": 3, "Overall rating": 8}\n```',
            {"rarity": 2, "complexity": 2, "informativeness": 3, "overall": 8},
        ),
        ('Sure! Here is my rating: {"rarity": 7, "overall": "9"} Hope it helps.', {"rarity": 7, "overall": 9}),
        (
            "Rarity: 4\nComplexity: 5\nInformativeness: 6\nOverall: 7",
            {"rarity": 4, "complexity": 5, "informativeness": 6, "overall": 7},
        ),
        ('[{"overall": 10, "rarity": 1}]', {"overall": 10, "rarity": 1}),
        ('{"overall_rating": 7.6}', {"overall": 8}),
    ],
)
def test_parse_reply_tolerant(reply, expected):
    assert parse_reply(reply) == expected


@pytest.mark.parametrize(
    "reply", ["", "   ", "I cannot rate this.", '{"rarity": 5}', '{"overall": 0}', '{"overall": 85}', "Overall: 11"]
)
def test_parse_reply_refuses_to_invent(reply):
    with pytest.raises(ReplyParseError):
        parse_reply(reply)


def test_expected_score_geval():
    dims = {"rarity": 3, "complexity": 4, "informativeness": 5, "overall": 8}
    tokens = json_tokens(dims)
    pos = len(tokens) - 2  # the overall value
    lp = token_logprobs(tokens, {pos: {"8": 0.6, "9": 0.3, "x": 0.05, "7": 0.05}})
    # renormalised over score tokens: (8*.6 + 9*.3 + 7*.05) / .95
    assert expected_score(lp) == pytest.approx((8 * 0.6 + 9 * 0.3 + 7 * 0.05) / 0.95, abs=1e-4)
    # the rarity value position is not used
    lp_r = token_logprobs(tokens, {4: {"3": 0.5, "9": 0.5}})
    assert expected_score(lp_r) == pytest.approx(8.0)
    assert expected_score(None) is None
    assert expected_score(token_logprobs(["no", " score"])) is None


# -- the reference rubric (the paper's rating script) ------------------------------------------------
def test_reference_rubric_prompt():
    (user,) = build_judge_messages(JudgeItem("  Q: What is 2+2?\nA: 4 ", "qa", style="reference"))
    assert user == {
        "role": "user",
        "content": "You are a data-quality estimator. Rate this **single** QA pair on Rarity, Complexity, "
        "Informativeness, and Overall (1-10 integers).\nReturn ONLY a JSON object like:\n"
        '{ "Rarity": <int>, "Complexity": <int>, "Informativeness": <int>, "Overall rating": <int> }\n\n'
        "### QA Pair:\n\n\n### Output:\nQ: What is 2+2?\nA: 4\n\n### Rating:",
    }  # one user turn, no system turn; the item stripped; only the item shown
    (cs,) = build_judge_messages(JudgeItem("C: x\nS: y", "cs", style="reference"))
    assert "Rate this **single** category–statement example on" in cs["content"]
    assert "### CS Example:\n" in cs["content"]
    assert [reference_kind(t) for t in ("mcq_mixup", "para", None, "general", "poem")] == [
        "mcq",
        "para",
        "qa",
        "qa",
        "qa",
    ]  # anything it does not know is rated as a QA pair, as the reference did


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            '{"Rarity": 6, "Complexity": 5, "Informativeness": 7, "Overall rating": 7.6}',
            {"rarity": 6, "complexity": 5, "informativeness": 7, "overall": 7},
        ),  # int() cuts 7.6 to 7 (our parser would round to 8)
        (
            'Sure. {"Overall rating": 9.9, "Rarity": "4"}',
            {"rarity": 4, "complexity": 0, "informativeness": 0, "overall": 9},
        ),
        ('{"Overall rating": 0, "Overall": 8}', {"rarity": 0, "complexity": 0, "informativeness": 0, "overall": 8}),
        (
            '[{"Overall": 3}, {"Overall rating": 9}]',
            {"rarity": 0, "complexity": 0, "informativeness": 0, "overall": 3},
        ),
        ('{"Rarity": 2, "Overall rating": 12}', {"rarity": 2, "complexity": 0, "informativeness": 0, "overall": 12}),
    ],
)
def test_parse_reply_reference(reply, expected):
    assert parse_reply_reference(reply) == expected
    assert compress_score(expected["overall"]) == min(9, max(4, expected["overall"])) - 4


@pytest.mark.parametrize(
    "reply",
    [
        "exception",  # what the reference's client returned after its retries: it scored it 0
        "",
        "{}",  # no Overall: 0 in the reference
        '{"Overall rating": "7.6"}',  # int("7.6") fails in the reference too
        "{Overall rating: 8}",  # not JSON
        'scores [1, 2] then {"Overall rating": 8}',  # the first array wins, and holds no object
    ],
)
def test_parse_reply_reference_failures_stay_failures(reply):
    with pytest.raises(ReplyParseError):
        parse_reply_reference(reply)


def test_openai_judge_reference_style(openai_server, tmp_path):
    def responder(body):
        assert [m["role"] for m in body["messages"]] == ["user"]
        if "UNPARSEABLE" in last_user_text(body):
            return {"content": "exception"}
        return {"content": 'Here you go: {"Rarity": 5, "Complexity": 6, "Informativeness": 7, "Overall rating": 8.7}'}

    server = openai_server(responder)
    judge = OpenAIJudge("stub-judge", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path, parse_retries=0)
    good, bad = judge.rate_many(
        [JudgeItem("Q: a?\nA: b.", "qa", style="reference"), JudgeItem("UNPARSEABLE", "qa", style="reference")],
        show_progress=False,
    )
    assert good.ok and good.raw == 8 and good.score == 4
    assert good.dims == {"rarity": 5, "complexity": 6, "informativeness": 7, "overall": 8}
    assert not bad.ok and bad.raw is None and bad.score is None  # the reference scored this 0


# -- the OpenAI judge over HTTP ------------------------------------------------------------------
def test_openai_judge_scores_and_expected(openai_server, tmp_path):
    server = openai_server(judge_responder)
    judge = OpenAIJudge("stub-judge", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path, base_delay=0.001)
    items = [JudgeItem(f"Q: question {i}?\nA: answer {i}.", "qa") for i in range(6)]
    ratings = judge.rate_many(items, show_progress=False)
    for item, r in zip(items, ratings, strict=True):
        body = "Question-Answer Pair\n" + item.text
        overall = scripted_overall(body)
        assert r.ok and r.raw == overall and r.score == compress_score(overall)
        assert r.dims == {"rarity": 5, "complexity": 6, "informativeness": 7, "overall": overall}
        lower = max(1, overall - 1)
        assert r.expected == pytest.approx(0.75 * overall + 0.25 * lower)
        assert json.loads(r.reply)["overall"] == overall and r.judge == "openai:stub-judge"
    sent = server.bodies[0]
    assert sent["response_format"] == {"type": "json_object"} and sent["logprobs"] is True
    assert sent["temperature"] == 0


def test_unparseable_reply_fails_never_zero(openai_server, tmp_path):
    server = openai_server(judge_responder)
    judge = OpenAIJudge("stub-judge", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path, parse_retries=2)
    (r,) = judge.rate_many([JudgeItem("UNPARSEABLE item", "general")], show_progress=False)
    assert not r.ok and r.raw is None and r.score is None and "unparseable" in r.error
    assert r.reply == "I would rather not say."
    assert server.n_requests == 3  # asked again twice, each time as a new request
    assert [b["temperature"] for b in server.bodies] == [0, 0.7, 0.7]


def test_judge_survives_faults(openai_server, tmp_path):
    server = openai_server(judge_responder, faults=Faults(rate_429=0.2, rate_500=0.1, rate_malformed=0.1, seed=1))
    judge = OpenAIJudge(
        "stub-judge", base_url=server.base_url, api_key=KEY, cache_dir=None, base_delay=0.001, max_retries=10
    )
    items = [JudgeItem(f"item {i}", "para") for i in range(30)]
    ratings = judge.rate_many(items, show_progress=False)
    assert all(
        r.ok and r.raw == scripted_overall("Paragraph\n" + it.text) for it, r in zip(items, ratings, strict=True)
    )
    assert sum(server.faults_sent.values()) > 0


# -- the local judge -----------------------------------------------------------------------------
LOCAL_ITEMS = [
    JudgeItem("Instruction:\nName the capital of France.\n\nResponse:\nParis.", "general"),
    JudgeItem("Q: What is 2+2?\nA: 5", "qa"),
    JudgeItem("C: Animals\nS: Whales are mammals that breathe air.", "cs"),
]


def _check_local(judge: LocalJudge) -> None:
    got: dict[int, int] = {}
    ratings = judge.rate_many(LOCAL_ITEMS, on_result=lambda i, r: got.__setitem__(i, r.raw), show_progress=False)
    assert sorted(got) == [0, 1, 2]
    for r in ratings:
        assert r.ok and 1 <= r.raw <= 10 and r.score == compress_score(r.raw)
        assert set(r.dims) == {"rarity", "complexity", "informativeness", "overall"}
        assert all(1 <= v <= 10 for v in r.dims.values())
        assert 1.0 <= r.expected <= 10.0
        assert json.loads(r.reply) == r.dims
    # batching (left padding + cached steps) does not change a score
    judge.batch_size = 1
    assert [r.as_struct() for r in judge.rate_many(LOCAL_ITEMS[:2], show_progress=False)] == [
        r.as_struct() for r in ratings[:2]
    ]


def test_local_judge_always_valid(tiny_qwen_dir):
    _check_local(LocalJudge(str(tiny_qwen_dir), batch_size=3))


@pytest.mark.slow
def test_local_judge_smollm2(smollm2_dir):
    _check_local(LocalJudge(str(smollm2_dir), batch_size=3))


# -- the reward ----------------------------------------------------------------------------------
def test_judge_reward_async_for_trl(openai_server, tmp_path):
    from trl.trainer.utils import is_async_callable

    from lmmixup_hf.rewards import JudgeReward

    server = openai_server(judge_responder)
    reward = JudgeReward("stub-judge", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path)
    assert is_async_callable(reward)
    completions = [
        "<think>\nmerge\n</think>\n\n<answer>\nQ: What is it?\nA: A bridge.\n</answer>",
        [{"role": "assistant", "content": "<think>x</think><answer>C: Tools\nS: A hammer drives nails.</answer>"}],
        "<think>only thinking</think><answer>  </answer>",
        "<answer>UNPARSEABLE</answer>",
    ]
    values = asyncio.run(reward(prompts=["p"] * 4, completions=completions, task_type=["qa_mixup", "cs", "qa", "qa"]))
    assert len(values) == 4
    for text, header, v in (
        (("Q: What is it?\nA: A bridge."), "Question-Answer Pair", values[0]),
        ("C: Tools\nS: A hammer drives nails.", "Category-Statement Example", values[1]),
    ):
        overall = scripted_overall(f"{header}\n{text}")
        exp = 0.75 * overall + 0.25 * max(1, overall - 1)
        assert v == pytest.approx((exp - 1) / 9)
        assert 0.0 <= v <= 1.0
    assert values[2] == 0.0  # empty answer: nothing to judge
    assert values[3] is None  # the judge failed: no invented reward
    headers = [re.search(r"### (.+)\n", last_user_text(b)).group(1) for b in server.bodies]
    assert "Question-Answer Pair" in headers and "Category-Statement Example" in headers
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.model == "stub-judge" and clone._judge is None


def test_judge_reward_pair_mode_reference_aware(openai_server, tmp_path):
    from lmmixup_hf.rewards.llm_judge import JudgeReward

    server = openai_server(judge_responder)
    reward = JudgeReward(
        "stub-judge", base_url=server.base_url, api_key=KEY, cache_dir=tmp_path, mode="pair", reference_aware=True
    )
    (v,) = asyncio.run(reward(prompts=[[{"role": "user", "content": "Say hi"}]], completions=["hi"], output=["hello"]))
    assert 0.0 <= v <= 1.0
    msg = last_user_text(server.bodies[0])
    assert "### Instruction-Response Pair\nInstruction:\nSay hi\n\nResponse:\nhi" in msg
    assert msg.rstrip().endswith("### Reference\nhello")


PREFIX_ITEMS = [
    *LOCAL_ITEMS,
    JudgeItem("Instruction: Name a prime number.\nResponse: 7", "general"),
    JudgeItem("Q: Capital of France?\nA: Paris", "qa", reference="Paris is the capital of France."),
    JudgeItem("Q: What is 3+3?\nA: 6, because three plus three is six.", "qa"),
    JudgeItem("C: Planets\nS: Mars is the fourth planet from the sun.", "cs"),
]


def _check_prefix_cache(path: str) -> None:
    cached = LocalJudge(path, batch_size=3)
    whole = LocalJudge(path, batch_size=1, prefix_cache=False)
    got: dict[int, Rating] = {}
    ratings = cached.rate_many(PREFIX_ITEMS, on_result=got.__setitem__, show_progress=False)
    assert sorted(got) == list(range(len(PREFIX_ITEMS)))
    assert [got[i] for i in range(len(PREFIX_ITEMS))] == ratings  # results land at their own index
    # the rubric prefix is encoded once per (kind, reference) and reused; scores equal the full prompt's
    assert len(cached._prefixes) == 4
    assert [r.as_struct() for r in ratings] == [
        r.as_struct() for r in whole.rate_many(PREFIX_ITEMS, show_progress=False)
    ]
    assert cached.usage.prompt_tokens < 0.7 * whole.usage.prompt_tokens  # 4 prefixes for 7 rows; less with more rows


def test_local_judge_prefix_cache_gives_the_same_scores(tiny_qwen_dir):
    _check_prefix_cache(tiny_qwen_dir)


@pytest.mark.slow
def test_local_judge_prefix_cache_gives_the_same_scores_smollm2(smollm2_dir):
    _check_prefix_cache(smollm2_dir)
