"""The benchmark metrics against hand-computed cases, and their `evaluate` module wrappers."""

from __future__ import annotations

import math

import pytest

from lmmixup_hf.evaluation import metrics


def test_normalize_answer():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.normalize_answer("An apple, a pear.") == "apple pear"


def test_squad_f1_hand_computed():
    # "cat sat" vs "cat sat down": precision 2/2, recall 2/3 -> F1 = 2*1*(2/3)/(1+2/3) = 0.8
    assert metrics.squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # best gold wins; "red big house" vs "big house": P 2/3, R 1 -> 0.8
    assert metrics.squad_f1("red big house", ["small car", "big house"]) == pytest.approx(0.8)
    # repeated tokens: "x x y" vs "x y y" share one x and one y -> P 2/3, R 2/3 -> 2/3
    assert metrics.squad_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert metrics.squad_f1("nothing", "something else") == 0.0
    assert metrics.squad_f1("", "") == 0.0  # SQuAD v1.1: no shared token is 0, even for two empties
    assert metrics.squad_f1("", "an answer") == 0.0


def test_squad_exact_match():
    assert metrics.squad_exact_match("The 1911.", ["1911"]) == 1.0
    assert metrics.squad_exact_match("in 1911", ["1911"]) == 0.0


@pytest.mark.parametrize(
    "output, expected",
    [
        ("So she has 24 - 5 = 19 pencils. The answer is 19.", "19"),
        ("They sell 1,200 + 2,400 = 3,600 rolls. The answer is 3,600.", "3600"),
        ("The temperature drops to -4 degrees.", "-4"),
        ("It costs 2.50 dollars.", "2.50"),
        ("no digits here", None),
    ],
)
def test_gsm_last_number(output, expected):
    assert metrics.gsm_last_number(output) == expected


def test_gsm_exact_match():
    assert metrics.gsm_exact_match("In total 3,600 rolls.", "2400 + 1200 = 3600\n#### 3,600") == 1.0
    assert metrics.gsm_exact_match("The answer is 51.0", "#### 51") == 1.0  # numeric comparison
    assert metrics.gsm_exact_match("The answer is 19, not 20.", "#### 19") == 0.0  # the LAST number counts
    assert metrics.gsm_exact_match("I do not know.", "#### 8") == 0.0


@pytest.mark.parametrize(
    "output, expected",
    [
        ("not False = True. So the answer is True.", "True"),
        ("Counting gives six. So the answer is (B).\nQ: next", "(B)"),
        ("The answer is 3.5. Done.", "3.5"),  # a decimal point is not the end of the answer
        ("so the answer is valid", "valid"),  # no final period: up to the end
        ("I am not sure", "I am not sure"),  # no cue: the whole output
    ],
)
def test_bbh_extract_answer(output, expected):
    assert metrics.bbh_extract_answer(output) == expected


def test_bbh_exact_match():
    assert metrics.bbh_exact_match("1 + 2 = 3. So the answer is 3.", "3") == 1.0
    assert metrics.bbh_exact_match("So the answer is (A).", "(B)") == 0.0


def test_truthfulqa_clean_answer():
    assert metrics.truthfulqa_clean_answer("\nA: Nothing happens.\nQ: another") == "Nothing happens."
    assert metrics.truthfulqa_clean_answer(" It is 78 years. ") == "It is 78 years."


def test_truth_info_hand_computed():
    # truth yes/no: [1, 0, 1, 1]; info yes/no: [1, 1, 0, 1] -> both: [1, 0, 0, 1]
    out = metrics.truth_info([0.9, 0.1, 0.5, 0.7], [0.6, 0.8, 0.49, 0.5])
    assert out == {"truth": 0.75, "info": 0.75, "truth_info": 0.5}
    assert metrics.truth_info([0.9], [0.9], threshold=0.95)["truth_info"] == 0.0
    assert math.isnan(metrics.truth_info([], [])["truth_info"])
    with pytest.raises(ValueError):
        metrics.truth_info([0.1], [0.1, 0.2])


def test_mc2_hand_computed():
    # probabilities 0.5, 0.25, 0.25 (log-space); true = first two -> 0.75
    lls = [math.log(0.5), math.log(0.25), math.log(0.25)]
    assert metrics.mc2(lls, [1, 1, 0]) == pytest.approx(0.75)
    # unnormalised log-likelihoods give the same normalised mass
    assert metrics.mc2([x - 100 for x in lls], [0, 0, 1]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        metrics.mc2(lls, [0, 0, 0])


def test_macro_mean_and_average():
    items = [("a", 1.0), ("a", 0.0), ("a", 1.0), ("b", 0.0)]  # a: 2/3, b: 0 -> 1/3 (micro would be 1/2)
    assert metrics.macro_mean(items) == pytest.approx(1 / 3)
    assert math.isnan(metrics.macro_mean([]))
    assert metrics.mean_skip_none([None, 1.0, 0.0, float("nan")]) == 0.5
    assert math.isnan(metrics.mean_skip_none([None, None]))
    assert metrics.openllm_average([60.0, 50.0, 40.0, 30.0, 20.0]) == pytest.approx(40.0)
    assert metrics.openllm_average([60.0, None, 40.0, 30.0, 20.0]) is None
    assert metrics.openllm_average([60.0, None, 40.0, 30.0, 20.0], missing_as_zero=True) == pytest.approx(30.0)


def test_evaluate_modules_load_offline():
    from lmmixup_hf.evaluation.evaluate_metrics import load_metric

    tydiqa = load_metric("tydiqa_f1").compute(
        predictions=["Paris", "the cat sat"],
        references=[["Paris"], ["a cat sat down"]],
        languages=["english", "finnish"],
    )
    assert tydiqa["f1"] == pytest.approx((1.0 + 0.8) / 2)
    assert tydiqa["exact_match"] == pytest.approx(0.5)
    gsm = load_metric("answer_exact_match").compute(
        predictions=["so 3,600 rolls", "x"], references=["#### 3,600", "5"]
    )
    assert gsm["exact_match"] == 0.5
    bbh = load_metric("answer_exact_match").compute(
        predictions=["So the answer is (B)."], references=["(B)"], mode="bbh"
    )
    assert bbh["exact_match"] == 1.0
    ti = load_metric("truth_info").compute(predictions=[0.9, 0.2, 0.7], references=[0.6, 0.9, 0.1])
    assert ti["truth_info"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        load_metric("rouge")
