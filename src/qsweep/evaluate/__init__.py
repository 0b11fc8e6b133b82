"""Scoring with lm-evaluation-harness on a model already in memory (harness.py), and the offline
MMLU task group built on lm-eval's own mmlu YAMLs (mmlu.py).

Imports config only; knows nothing of Ray, MLflow or training.
"""
