"""TyDiQA-GoldP / SQuAD token F1 and exact match (max over the gold answers), in [0, 1].

With ``languages`` the scores are macro-averaged over languages, as the TyDiQA protocol reports.
"""

import datasets
import evaluate

from lmmixup_hf.evaluation import metrics

_DESCRIPTION = "SQuAD-style F1 and exact match against several gold answers, optionally macro-averaged by language."
_INPUTS = """
Args:
    predictions: list of predicted answers (str).
    references: list of lists of gold answers.
    languages: optional list of language names, one per prediction, for a macro average.
Returns:
    f1, exact_match: floats in [0, 1].
"""


class TydiqaF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, languages=None):
        groups = languages if languages is not None else ["all"] * len(predictions)
        f1 = [(g, metrics.squad_f1(p, r)) for g, p, r in zip(groups, predictions, references)]
        em = [(g, metrics.squad_exact_match(p, r)) for g, p, r in zip(groups, predictions, references)]
        return {"f1": metrics.macro_mean(f1), "exact_match": metrics.macro_mean(em)}
