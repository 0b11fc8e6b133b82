"""Scoring with lm-evaluation-harness on a model already in memory.

Imports config only; knows nothing of Ray, MLflow or training.
"""
