"""ASHA's cross-field rules: it needs a validation loss, and rungs inside a trial's training steps."""

from __future__ import annotations

from qsweep.config.schema import SweepConfig
from qsweep.train.data import DataFileError, is_local, local_path, read_local_rows


def check_asha_validation(sweep: SweepConfig) -> list[str]:
    if not sweep.search.asha.enabled or sweep.data.validation is not None:
        return []
    return ["data.validation: required while search.asha.enabled is true, because ASHA stops trials on their "
            "validation loss; add a validation file or set search.asha.enabled: false"]


def base_steps(sweep: SweepConfig) -> tuple[int | None, str]:
    """The base trial's training steps and how to name them; None when it trains for epochs on data
    not read here (a hub dataset, or a file preflight.data reports)."""
    training = sweep.training
    if training.max_steps is not None:
        return training.max_steps, f"training.max_steps ({training.max_steps})"
    if not is_local(sweep.data.train, sweep.base_dir):
        return None, ""
    try:
        rows = sum(1 for _ in read_local_rows(local_path(sweep.data.train, sweep.base_dir)))
    except (DataFileError, UnicodeDecodeError, OSError):
        return None, ""
    steps = training.total_steps(rows)
    return steps, f"the {steps} steps of training.num_epochs = {training.num_epochs:g} over {rows} rows"


def check_asha_grace(sweep: SweepConfig) -> list[str]:
    grace, (steps, named) = sweep.search.asha.grace_steps, base_steps(sweep)
    if not sweep.search.asha.enabled or steps is None or grace <= steps:
        return []
    return [f"search.asha.grace_steps: {grace} is above {named}, so ASHA could never stop "
            f"a trial; set it to at most {steps}, or train for more steps"]


def check_asha_eval_every(sweep: SweepConfig) -> list[str]:
    every, (steps, named) = sweep.training.eval_every, base_steps(sweep)
    if not sweep.search.asha.enabled or steps is None or every <= steps:
        return []
    return [f"training.eval_every: {every} is above {named}, so no validation loss reaches "
            f"ASHA before a trial ends; set it to at most {steps}"]


def check_asha(sweep: SweepConfig) -> list[str]:
    return check_asha_validation(sweep) + check_asha_grace(sweep) + check_asha_eval_every(sweep)
