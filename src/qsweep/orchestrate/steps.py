"""How many optimizer steps a sweep's trials take, as the driver needs it: ASHA's last rung must
reach the longest trial (a trial past it would be stopped there, before it is scored), and the live
view shows each trial's step / total. A trial trains for training.max_steps, or for num_epochs
turned into steps from the training set's size (TrainingConfig.total_steps, the Trainer's rule).
"""

from __future__ import annotations

import itertools

from pydantic import ValidationError

from qsweep.config.schema import SweepConfig
from qsweep.search.space import SearchSpace, apply_params

# The fields a trial's step count depends on.
STEP_FIELDS = ("training.max_steps", "training.num_epochs", "training.batch_size",
               "training.gradient_accumulation_steps")


def uses_epochs(sweep: SweepConfig, space: SearchSpace | None) -> bool:
    return sweep.training.num_epochs is not None or bool(space and "training.num_epochs" in space.params)


def train_rows(sweep: SweepConfig, space: SearchSpace | None) -> int:
    """The training set's rows, read (through `datasets`, as the trial reads them) only when some
    trial trains for epochs; 0 otherwise, where no step count depends on it."""
    if not uses_epochs(sweep, space):
        return 0
    from qsweep.train.data import load_rows

    return load_rows(sweep.data.train, sweep.base_dir).num_rows


def longest_trial_steps(sweep: SweepConfig, space: SearchSpace | None, rows: int) -> int:
    """The most steps a trial of the space takes: each combination of the extreme values of the
    fields steps depend on (fewer rows per step and more epochs or steps give more)."""
    base = sweep.trial()
    searched = [name for name in STEP_FIELDS if space and name in space.params]
    steps = [base.training.total_steps(rows)]
    for values in itertools.product(*(space.params[name].edge_values() for name in searched)):
        try:
            trial = apply_params(base, {space.key(name): value for name, value in zip(searched, values)})
        except ValidationError:
            continue  # not a trial the space can give (validate reports it)
        steps.append(trial.training.total_steps(rows))
    return max(steps)
