"""The ASHA scheduler qsweep builds: real Ray scheduler objects, driven result by result."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from qsweep.config.schema import SweepConfig
from qsweep.search.scheduler import build_scheduler


def _scheduler(tiny_sweep_dict: dict, **asha):
    tiny_sweep_dict["training"].update({"max_steps": 40, "eval_every": 10})
    tiny_sweep_dict["search"]["asha"] = {"grace_steps": 20, "reduction_factor": 2, **asha}
    scheduler = build_scheduler(SweepConfig(**tiny_sweep_dict))
    scheduler.set_search_properties("eval_loss", "min")
    return scheduler


def _report(scheduler, trial_id: str, loss: float) -> str:
    trial = SimpleNamespace(trial_id=trial_id)
    if trial_id not in getattr(scheduler, "_trial_info", {trial_id: None}):
        scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, {"step": 20, "eval_loss": loss})


def test_plain_asha_stops_the_second_trial_on_one_comparison(tiny_sweep_dict):
    scheduler = _scheduler(tiny_sweep_dict, min_trials_per_rung=1)
    assert _report(scheduler, "a", 1.0) == TrialScheduler.CONTINUE
    assert _report(scheduler, "b", 1.1) == TrialScheduler.STOP


def test_the_first_trials_at_a_rung_continue_then_the_worst_are_stopped(tiny_sweep_dict):
    scheduler = _scheduler(tiny_sweep_dict, min_trials_per_rung=3)
    assert [_report(scheduler, t, loss) for t, loss in (("a", 1.0), ("b", 1.2), ("c", 1.4))] == [
        TrialScheduler.CONTINUE] * 3
    assert _report(scheduler, "d", 1.5) == TrialScheduler.STOP
    assert _report(scheduler, "e", 0.9) == TrialScheduler.CONTINUE


def test_asha_off_never_stops(tiny_sweep_dict):
    scheduler = _scheduler(tiny_sweep_dict, enabled=False)
    assert all(_report(scheduler, t, 10.0 + i) == TrialScheduler.CONTINUE for i, t in enumerate("abcdef"))


def test_the_private_ray_fields_patient_asha_reads_are_still_there(tiny_sweep_dict):
    """PatientASHA reads ASHAScheduler's `_trial_info` (trial id -> bracket), the bracket's `_rungs`
    ((milestone, {trial id: value}) pairs) and `_num_stopped`: Ray has no public API for them. An
    upgrade of Ray that renames or reshapes them fails here, not silently in a sweep."""
    scheduler = _scheduler(tiny_sweep_dict, min_trials_per_rung=2)
    _report(scheduler, "a", 1.0)
    bracket = scheduler._trial_info["a"]
    milestones = [milestone for milestone, recorded in bracket._rungs]
    assert milestones == [40, 20] and bracket._rungs[1][1] == {"a": -1.0}  # Ray records -loss for mode=min
    assert scheduler._num_stopped == 0


def test_num_stopped_counts_only_real_stops_in_rays_public_debug_string(tiny_sweep_dict):
    scheduler = _scheduler(tiny_sweep_dict, min_trials_per_rung=2)
    decisions = [_report(scheduler, t, loss) for t, loss in (("a", 1.0), ("b", 1.2), ("c", 1.4), ("d", 1.5))]
    assert decisions == [TrialScheduler.CONTINUE] * 2 + [TrialScheduler.STOP] * 2
    assert scheduler.debug_string().startswith("Using AsyncHyperBand: num_stopped=2")
