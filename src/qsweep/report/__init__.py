"""What users read of a sweep: its progress table (live and `qsweep status`), leaderboard, promote/export,
replay of a logged trial, ablation statistics.

Reads MLflow through tracking; never starts Ray or a sweep.
"""
