"""Exact match after the benchmark's answer extraction: ``gsm8k`` (last number of the output vs. the
number after ``####``) or ``bbh`` (text after "the answer is" vs. the target)."""

import datasets
import evaluate

from lmmixup_hf.evaluation import metrics

_INPUTS = """
Args:
    predictions: list of model outputs (str).
    references: list of gold answers (a GSM8K solution or number; a BBH target).
    mode: "gsm8k" (default) or "bbh".
Returns:
    exact_match: float in [0, 1].
"""

_SCORERS = {"gsm8k": metrics.gsm_exact_match, "bbh": metrics.bbh_exact_match}


class AnswerExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Exact match of the extracted final answer (GSM8K, BBH).",
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, mode="gsm8k"):
        if mode not in _SCORERS:
            raise ValueError(f"mode must be one of {sorted(_SCORERS)}, got {mode!r}")
        score = _SCORERS[mode]
        values = [score(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(values) / len(values) if values else float("nan")}
