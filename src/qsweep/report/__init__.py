"""What users read after a sweep: leaderboard, promote/export, replay of a logged trial, ablation statistics.

Reads MLflow through tracking; never starts Ray or a sweep.
"""
