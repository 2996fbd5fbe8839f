"""Benchmark metrics as plain functions: the single implementation behind the lm-eval hooks
(``eval_tasks/*/utils.py``), the local ``evaluate`` modules and ``lmmixup eval-report``.

Everything returns fractions in [0, 1]; reports scale to percentages. Two families:

- ``*_protocol_*`` and ``protocol_exact_match`` score as the downstream protocol of the method
  (the DS2 / open-instruct evaluation scripts; see ``docs/evaluation.md``): the ``lmmixup_openllm``
  tasks use them, so their numbers compare with the paper's table.
- ``gsm_exact_match`` / ``bbh_exact_match`` are our lenient variants (numeric comparison, decimal
  points inside the answer), kept for the ``answer_exact_match`` ``evaluate`` module.

TyDiQA uses SQuAD v1.1 F1 / exact match in both.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

# --- SQuAD / TyDiQA ------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and English articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Token F1 against the best-matching gold answer.

    As SQuAD v1.1's script: no shared token means 0, even when both sides normalise to nothing.
    """
    golds = [golds] if isinstance(golds, str) else list(golds)
    return max((_f1(prediction, g) for g in golds), default=0.0)


def squad_exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    golds = [golds] if isinstance(golds, str) else list(golds)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


# --- GSM8K ---------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gsm_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed (None when there is none)."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "")


def gsm_gold(answer: str) -> str:
    """The gold number of a GSM8K solution: the text after ``####``, commas removed."""
    return answer.split("####")[-1].strip().replace(",", "")


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-9)
    except ValueError:
        return a.strip() == b.strip()


def gsm_exact_match(output: str, gold: str) -> float:
    """1.0 when the last number of ``output`` equals ``gold`` (a number or a ``####`` solution)."""
    pred = gsm_last_number(output)
    return float(pred is not None and _same_number(pred, gsm_gold(gold)))


# --- the protocol's scoring (DS2 / open-instruct eval scripts) ----------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_PROTOCOL_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")
_PROTOCOL_ANSWER_IS = re.compile(r"[t|T]he answer is (.*?)\.")


def protocol_exact_match(prediction: str, reference: str) -> float:
    """``evaluate``'s exact_match with ``ignore_case`` and ``ignore_punctuation``: both sides
    lower-cased and stripped of ASCII punctuation, then compared as they are (no trimming).

    So ``18.0`` vs ``18`` is a miss (``180`` vs ``18``), ``-5`` vs ``5`` a hit, ``.5`` vs ``0.5`` a miss.
    """
    return float(prediction.lower().translate(_PUNCT_TABLE) == reference.lower().translate(_PUNCT_TABLE))


def gsm_protocol_gold(answer: str) -> str:
    """The protocol's GSM8K target: the text after ``####``, stripped, digit-group commas removed."""
    return _DIGIT_COMMA.sub(r"\1\2", answer.split("####")[-1].strip())


def gsm_protocol_answer(output: str) -> str:
    """The protocol's GSM8K prediction: the last number of the output as a string (no sign on an
    integer, as its pattern reads it), or the whole output when there is no number."""
    numbers = _PROTOCOL_NUMBER.findall(_DIGIT_COMMA.sub(r"\1\2", output))
    return numbers[-1] if numbers else output


def gsm_protocol_exact_match(output: str, gold: str) -> float:
    """Protocol GSM8K score of one output against a gold number or a ``####`` solution."""
    return protocol_exact_match(gsm_protocol_answer(output), gsm_protocol_gold(gold))


def bbh_protocol_answer(output: str) -> str:
    """The protocol's BBH prediction: the text between the first "the answer is" / "The answer is"
    and the next period on the same line, stripped; the whole output (stripped) when absent."""
    m = _PROTOCOL_ANSWER_IS.search(output)
    return (m.group(1) if m else output).strip()


def bbh_protocol_exact_match(output: str, target: str) -> float:
    return protocol_exact_match(bbh_protocol_answer(output), target)


# --- BBH -----------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"the answer is (.*?)(?:\.(?:\s|$)|\n|$)", re.IGNORECASE | re.DOTALL)


def bbh_extract_answer(text: str) -> str:
    """The text after the first "the answer is" up to the next period (whole output if absent)."""
    m = _ANSWER_IS.search(text)
    answer = m.group(1) if m else text
    return answer.strip()


def bbh_exact_match(output: str, target: str) -> float:
    pred = bbh_extract_answer(output)
    return float(pred == target.strip() or pred.rstrip(".") == target.strip())


# --- TruthfulQA ----------------------------------------------------------------------------------


def truthfulqa_clean_answer(output: str) -> str:
    """Trim a TruthfulQA generation as the protocol does: strip, drop a leading ``A:``, cut at a
    later ``Q:``, and turn paragraph breaks into spaces."""
    text = output.strip()
    if text.startswith("A:"):
        text = text[2:].strip()
    return text.split("Q:")[0].strip().replace("\n\n", " ")


def truth_info(truth_probs: Iterable[float], info_probs: Iterable[float], threshold: float = 0.5) -> dict[str, float]:
    """Aggregate judge probabilities: a judge says yes when P(yes) >= ``threshold``.

    Returns ``truth`` and ``info`` (fraction judged truthful / informative) and ``truth_info``
    (fraction judged both), the TruthfulQA generation score.
    """
    t = np.asarray(list(truth_probs), dtype=np.float64) >= threshold
    i = np.asarray(list(info_probs), dtype=np.float64) >= threshold
    if t.shape != i.shape:
        raise ValueError(f"truth and info judge scores differ in length ({t.size} vs {i.size})")
    if t.size == 0:
        return {"truth": math.nan, "info": math.nan, "truth_info": math.nan}
    return {"truth": float(t.mean()), "info": float(i.mean()), "truth_info": float((t & i).mean())}


def mc2(loglikelihoods: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: the normalised probability mass on the true answers."""
    ll = np.asarray(loglikelihoods, dtype=np.float64)
    lab = np.asarray(labels, dtype=bool)
    if ll.shape != lab.shape or not lab.any():
        raise ValueError("mc2 needs one label per choice and at least one true choice")
    p = np.exp(ll - ll.max())
    return float(p[lab].sum() / p.sum())


# --- aggregation ---------------------------------------------------------------------------------


def macro_mean(items: Iterable[tuple[str, float]]) -> float:
    """Mean over groups of per-group means (BBH tasks, TyDiQA languages)."""
    by_group: dict[str, list[float]] = defaultdict(list)
    for group, value in items:
        by_group[group].append(float(value))
    if not by_group:
        return math.nan
    return float(np.mean([np.mean(v) for v in by_group.values()]))


def mean_skip_none(items: Iterable[float | None]) -> float:
    """Mean of the values that are not None/NaN (NaN when none are)."""
    values = [float(v) for v in items if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else math.nan


def openllm_average(scores: Sequence[float | None], missing_as_zero: bool = False) -> float | None:
    """The paper's Avg: the plain mean of the five benchmark scores.

    A missing score makes the average undefined (None) unless ``missing_as_zero``, which counts it
    as 0 as the reference aggregation script did.
    """
    values = []
    for s in scores:
        if s is None or (isinstance(s, float) and math.isnan(s)):
            if not missing_as_zero:
                return None
            s = 0.0
        values.append(float(s))
    return float(np.mean(values)) if values else None
