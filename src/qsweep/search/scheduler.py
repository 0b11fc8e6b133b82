"""ASHA as Ray Tune runs it, patient with the first trials at each rung.

Defined at module level so Ray's experiment state pickles it by reference: a resumed sweep runs the
installed code, not a copy frozen into the state file.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from qsweep.config.schema import SweepConfig


class PatientASHA(ASHAScheduler):
    """ASHA that lets the first few trials at each rung through.

    Ray's ASHA cuts at a percentile of the values already recorded at a rung, so with one value
    recorded the second trial there is stopped whenever it is worse than the first: in a small
    sweep that stops a whole branch (e.g. every fp4 trial) on a single comparison.

    Ray 2.60 has no public API for a rung's recorded trials, so this reads ASHAScheduler's private
    `_trial_info`, its bracket's `_rungs` and `_num_stopped`; tests/test_scheduler.py pins their
    shape against the real Ray, so an upgrade that changes them fails there.
    """

    def __init__(self, min_trials_per_rung: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.min_trials_per_rung = min_trials_per_rung

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.STOP or trial.trial_id not in self._trial_info:
            return decision
        reached = result[self._time_attr]
        rung = next((recorded for milestone, recorded in self._trial_info[trial.trial_id]._rungs
                     if milestone <= reached and trial.trial_id in recorded), None)
        if rung is not None and len(rung) <= self.min_trials_per_rung:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return decision


def build_scheduler(sweep: SweepConfig, max_steps: int | None = None) -> Any:
    """`max_steps`: the most steps any trial takes (orchestrate.steps), by default the base trial's."""
    asha = sweep.search.asha
    if not asha.enabled:
        return FIFOScheduler()
    return PatientASHA(
        min_trials_per_rung=asha.min_trials_per_rung, time_attr="step", metric="eval_loss", mode="min",
        max_t=max_steps or sweep.training.max_steps, grace_period=asha.grace_steps,
        reduction_factor=asha.reduction_factor,
    )
