"""Our metrics as local ``evaluate`` modules, loadable offline (Hub-hosted metrics are not).

>>> from lmmixup_hf.evaluation.evaluate_metrics import load_metric
>>> load_metric("tydiqa_f1").compute(predictions=["Paris"], references=[["Paris", "paris, France"]])
{'f1': 1.0, 'exact_match': 1.0}

Each module is a thin wrapper over :mod:`lmmixup_hf.evaluation.metrics`, the one implementation.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
METRICS = ("tydiqa_f1", "answer_exact_match", "truth_info")


def metric_path(name: str) -> str:
    """The folder of a local metric, for ``evaluate.load(path)``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return str(HERE / name)


def load_metric(name: str, **kwargs):
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
