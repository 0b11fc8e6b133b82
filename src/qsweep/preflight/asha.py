"""ASHA's cross-field rules: it needs a validation loss, and rungs inside training.max_steps."""

from __future__ import annotations

from qsweep.config.schema import SweepConfig


def check_asha_validation(sweep: SweepConfig) -> list[str]:
    if not sweep.search.asha.enabled or sweep.data.validation is not None:
        return []
    return ["data.validation: required while search.asha.enabled is true, because ASHA stops trials on their "
            "validation loss; add a validation file or set search.asha.enabled: false"]


def check_asha_grace(sweep: SweepConfig) -> list[str]:
    grace, steps = sweep.search.asha.grace_steps, sweep.training.max_steps
    if not sweep.search.asha.enabled or grace <= steps:
        return []
    return [f"search.asha.grace_steps: {grace} is above training.max_steps ({steps}), so ASHA could never stop "
            f"a trial; set it to at most {steps}, or raise training.max_steps"]


def check_asha_eval_every(sweep: SweepConfig) -> list[str]:
    every, steps = sweep.training.eval_every, sweep.training.max_steps
    if not sweep.search.asha.enabled or every <= steps:
        return []
    return [f"training.eval_every: {every} is above training.max_steps ({steps}), so no validation loss reaches "
            f"ASHA before a trial ends; set it to at most {steps}"]


def check_asha(sweep: SweepConfig) -> list[str]:
    return check_asha_validation(sweep) + check_asha_grace(sweep) + check_asha_eval_every(sweep)
