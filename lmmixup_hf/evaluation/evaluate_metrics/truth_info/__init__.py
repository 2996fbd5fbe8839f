"""A local `evaluate` metric module (see lmmixup_hf.evaluation.evaluate_metrics)."""
