"""Metrics, the TruthfulQA judges, local `evaluate` modules and the paper-style report."""
