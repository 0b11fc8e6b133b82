"""Ray Tune's OptunaSearch, told only final scores, over an Optuna study kept in sqlite.

Defined at module level so Ray's experiment state pickles it by reference: a resumed sweep runs the
installed code, not a copy frozen into the state file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from qsweep.config.schema import SweepConfig
from qsweep.search.objective import FAILED, OBJECTIVE, searcher_metrics
from qsweep.search.space import DefineByRun, SearchSpace


class FinalScoreOptunaSearch(OptunaSearch):
    """Optuna only ever sees the final lm-eval score.

    Intermediate results carry validation loss for ASHA; Ray's OptunaSearch would index the
    objective in every result. A trial ASHA stops has no score and is told to Optuna as pruned.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and FAILED in result:
            result, error = None, True
        # With several objectives Ray would tell Optuna a list of Nones as values.
        if result and isinstance(self.metric, list) and OBJECTIVE not in result:
            result = None
        super().on_trial_complete(trial_id, result, error)


def build_searcher(sweep: SweepConfig, space: SearchSpace, concurrency: int, folder: Path) -> Any:
    metrics, modes = searcher_metrics(sweep.search)
    searcher = FinalScoreOptunaSearch(
        space=DefineByRun(space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=sweep.search.baselines or None,
        sampler=optuna.samplers.TPESampler(seed=sweep.search.sampler_seed, n_startup_trials=4),
        study_name=sweep.name,
        storage=optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}"),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
