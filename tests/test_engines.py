"""The engines behind one interface: transformers (batched, left padding, stops), openai (loopback
server through the shared ChatClient) and vllm's clear error when it is not installed."""

import importlib.util

import pytest
from openai_server import openai_server  # noqa: F401  (fixture)

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.distiller.engines import ApproxTokenizer, Generation, cut_at_stop, make_engine
from lmmixup_hf.distiller.prompts import build_messages, format_target, linearize_cluster

CONVS = [
    build_messages(linearize_cluster([("what is a tulip", "a flower"), ("where from", "central asia")]), "qa"),
    build_messages(linearize_cluster([("capital of france?", "paris")]), "qa"),
    build_messages(
        linearize_cluster(["Q: a much longer member to force different prompt lengths in one batch\nA: ok"] * 3), "cs"
    ),
]


def test_cut_at_stop():
    assert cut_at_stop("<answer>x</ANSWER> trailing", ["</answer>"]) == ("<answer>x</ANSWER>", True)
    assert cut_at_stop("no stop here", ["</answer>"]) == ("no stop here", False)


def test_transformers_engine_batched_equals_single(tiny_qwen_dir):
    engine = make_engine("transformers", tiny_qwen_dir, batch_size=3, ignored_option=1)
    batched = engine.generate(CONVS, max_new_tokens=12)
    assert all(isinstance(g, Generation) for g in batched) and len(batched) == 3
    single = make_engine("transformers", tiny_qwen_dir, batch_size=1).generate(CONVS, max_new_tokens=12)
    assert [g.text for g in batched] == [g.text for g in single]  # left padding does not change greedy output
    for g, conv in zip(batched, CONVS):
        n_prompt = len(engine.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))
        assert g.prompt_tokens > 0 and n_prompt > 0
        assert 0 < g.completion_tokens <= 12 and g.finish_reason in ("stop", "length")
        assert g.finish_reason == "stop" or g.completion_tokens == 12
    assert engine.describe()["dtype"] == "float32" and engine.describe()["attn_implementation"] == "sdpa"


def test_scaffold_writes_the_tags_and_the_model_fills_them(tiny_qwen_dir):
    engine = make_engine("transformers", tiny_qwen_dir, scaffold=True, think_tokens=5, answer_prefix="Q:")
    gens = engine.generate(CONVS[:2], max_new_tokens=12)
    for g in gens:
        assert g.text.startswith("<think>\n") and g.text.count("<think>") == 1
        assert g.text.count("\n</think>\n\n<answer>\nQ:") == 1  # tags from the engine, text between from the model
        assert 0 < g.completion_tokens <= 12
    assert engine.describe()["scaffold"] is True


@pytest.mark.slow
def test_transformers_engine_stops_at_eos_with_smollm2(smollm2_dir):
    engine = make_engine("transformers", smollm2_dir, batch_size=2)
    gens = engine.generate(CONVS[:2], max_new_tokens=40)
    assert all(g.text.strip() for g in gens)
    assert all("<|im_end|>" not in g.text for g in gens)


def test_openai_engine_against_local_server(openai_server):  # noqa: F811
    replies = {
        "tulip": format_target("Q: What is a tulip?\nA: A flower.", "merge") + " extra after stop",
        "france": "<think>x</think><answer>Q: Capital?\nA: Paris.",
    }

    def responder(body):
        user = body["messages"][-1]["content"].lower()
        return next((v for k, v in replies.items() if k in user), "no format")

    server = openai_server(responder, latency=0.05)
    engine = make_engine(
        "openai",
        "stub-model",
        base_url=server.base_url,
        api_key="sk-local",
        max_concurrency=3,
        tokenizer="no-such-tokenizer-offline",
        show_progress=False,
    )
    assert isinstance(engine.tokenizer, ApproxTokenizer)
    gens = engine.generate(CONVS, max_new_tokens=64)
    assert gens[0].text.endswith("</answer>") and "extra after stop" not in gens[0].text
    assert gens[1].text.endswith("Paris.") and gens[2].text == "no format"
    assert all(g.finish_reason == "stop" and g.completion_tokens > 0 and g.prompt_tokens > 0 for g in gens)
    assert server.max_in_flight <= 3 and len(server.bodies) == 3
    body = server.bodies[0]
    assert body["messages"] in CONVS and body["max_tokens"] == 64 and body["temperature"] == 0
    assert body["stop"] == ["</answer>"] and "top_p" not in body
    assert engine.describe()["usage"]["n_requests"] == 3


def test_openai_engine_reports_failures_as_errors(openai_server):  # noqa: F811
    from openai_server import Faults

    server = openai_server(lambda body: "x", faults=Faults(rate_500=1.0))
    engine = make_engine(
        "openai",
        "stub-model",
        base_url=server.base_url,
        api_key="k",
        max_retries=0,
        show_progress=False,
        tokenizer="none",
    )
    (g,) = engine.generate(CONVS[:1], max_new_tokens=8)
    assert g.finish_reason == "error" and g.error and g.text == ""


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_names_the_extra():
    with pytest.raises(LmmixupError, match=r"lmmixup-hf\[vllm\]"):
        make_engine("vllm", "any-model")


def test_unknown_engine():
    with pytest.raises(LmmixupError, match="unknown engine"):
        make_engine("tgi", "m")
