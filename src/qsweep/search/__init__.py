"""What to try next: search spaces (YAML -> Optuna define-by-run), the objective, Ray's Optuna searcher and ASHA.

Imports config only; never trains, scores or tracks.
"""
