"""Evaluation with the research protocol: metrics, fixed test fragments, baselines and the report."""
