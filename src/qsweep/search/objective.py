"""What a trial is ranked by: one lm-eval metric, or a weighted mean of several."""

from __future__ import annotations

from qsweep.config.schema import SearchConfig

# Keys of a trial's last Ray result: the value Optuna ranks by, and the traceback of a trial that failed.
OBJECTIVE = "objective"
FAILED = "failed"


def objective_value(scores: dict[str, float], search: SearchConfig) -> float:
    """With weights: sum(w_i * s_i) / sum(|w_i|); a negative weight marks a lower-is-better metric,
    so the objective is always to be maximized. Without weights: the metric itself."""
    if not search.weights:
        if search.metric not in scores:
            raise KeyError(f"search.metric {search.metric!r} is not among the scores: {sorted(scores)}")
        return scores[search.metric]
    missing = sorted(set(search.weights) - set(scores))
    if missing:
        raise KeyError(f"search.weights name {missing}, which are not among the scores: {sorted(scores)}")
    total = sum(abs(w) for w in search.weights.values())
    return sum(w * scores[m] for m, w in search.weights.items()) / total


def searcher_metrics(search: SearchConfig, objective_key: str = OBJECTIVE) -> tuple[list[str], list[str]]:
    """Result keys and modes Optuna optimizes: the objective, then any trade-offs (multi-objective)."""
    mode = "max" if search.direction == "maximize" else "min"
    keys = [objective_key] + [t.metric for t in search.tradeoffs]
    modes = [mode] + ["max" if t.direction == "maximize" else "min" for t in search.tradeoffs]
    return keys, modes
