"""Ray Tune's OptunaSearch, told only final scores, over an Optuna study kept in sqlite.

Defined at module level so Ray's experiment state pickles it by reference: a resumed sweep runs the
installed code, not a copy frozen into the state file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
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


# On a trial enqueued again because the driver died while it ran: the number of the trial it retries.
RETRY_OF = "qsweep.retry_of"


@dataclass
class Tried:
    """Outcomes the study already holds from earlier attempts of the sweep."""

    finished: int = 0
    stopped: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.finished + self.stopped + self.failed


def _storage(folder: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")


def prepare_study(sweep: SweepConfig, folder: Path, space: SearchSpace | None = None) -> Tried:
    """Readies the study for a new Tuner and says what it already holds.

    A new Tuner over an existing study means the driver died before Ray saved its experiment state,
    so no trial of the study is still running: each trial left RUNNING is failed and its point
    enqueued once for a retry, and a baseline point is enqueued only if the study has never seen it
    (a baseline gives a tied param's value, which the study knows as its ratio: SearchSpace.trial_point).
    """
    _, modes = searcher_metrics(sweep.search)
    study = optuna.create_study(storage=_storage(folder), study_name=sweep.name, load_if_exists=True,
                                directions=["minimize" if m == "min" else "maximize" for m in modes])
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.system_attrs.get("fixed_params", trial.params), user_attrs={RETRY_OF: trial.number})
    for point in sweep.search.baselines:
        study.enqueue_trial(space.trial_point(point, sweep.trial()) if space else point, skip_if_exists=True)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    states = [t.state for t in trials if t.number not in retried]
    return Tried(finished=states.count(TrialState.COMPLETE), stopped=states.count(TrialState.PRUNED),
                 failed=states.count(TrialState.FAIL))


def build_searcher(sweep: SweepConfig, space: SearchSpace, concurrency: int, folder: Path) -> Any:
    """Ray's searcher over the study in `folder`; its baseline points come from prepare_study."""
    metrics, modes = searcher_metrics(sweep.search)
    searcher = FinalScoreOptunaSearch(
        space=DefineByRun(space),
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        # Concurrent trials are suggested before the others report: without constant_liar TPE
        # sees the same history for each and suggests near-identical points. Said explicitly,
        # because Optuna 4 (which pyproject allows) defaults it off and Optuna 5 on.
        sampler=optuna.samplers.TPESampler(seed=sweep.search.sampler_seed, n_startup_trials=4,
                                           constant_liar=concurrency > 1),
        study_name=sweep.name,
        storage=_storage(folder),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
