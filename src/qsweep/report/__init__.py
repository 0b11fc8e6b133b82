"""What users read of a sweep: its progress table (live view and `qsweep status`), leaderboard,
promote/export, replay of a logged trial, ablation statistics (ablation, ablation_report) and the
search insight (insight).

Reads MLflow through tracking and reloads adapters through train and evaluate; never imports Ray or
starts a sweep.
"""
