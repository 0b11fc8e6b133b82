"""The searcher qsweep builds: Ray's OptunaSearch over a real Optuna study in sqlite."""

from __future__ import annotations

from pathlib import Path

import optuna

from qsweep.config.schema import SweepConfig
from qsweep.search.objective import FAILED, OBJECTIVE
from qsweep.search.searcher import build_searcher
from qsweep.search.space import load_space

REPO = Path(__file__).resolve().parent.parent


def _searcher(tiny_sweep_dict: dict, tmp_path, **search):
    tiny_sweep_dict["search"].update(search)
    sweep = SweepConfig(**tiny_sweep_dict)
    limiter = build_searcher(sweep, load_space(REPO / "search_spaces" / "qlora.yaml"), 4, tmp_path)
    return limiter.searcher, optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{tmp_path}/optuna.db")


def test_final_scores_failures_and_stopped_trials_reach_optuna(tiny_sweep_dict, tmp_path):
    searcher, study = _searcher(tiny_sweep_dict, tmp_path)
    for trial_id in "abc":
        assert searcher.suggest(trial_id)
    searcher.on_trial_result("a", {"step": 5, "eval_loss": 1.0})
    searcher.on_trial_complete("a", {"step": 10, "eval_loss": 0.9, OBJECTIVE: 0.75})
    searcher.on_trial_complete("b", {FAILED: "Traceback ...\nTrialDiverged: loss became nan"})
    searcher.on_trial_complete("c", {"step": 5, "eval_loss": 2.0})
    states = {t.number: (t.state.name, t.values) for t in study.trials}
    assert states == {0: ("COMPLETE", [0.75]), 1: ("FAIL", None), 2: ("PRUNED", None)}


def test_tradeoffs_make_a_multi_objective_study(tiny_sweep_dict, tmp_path):
    searcher, study = _searcher(
        tiny_sweep_dict, tmp_path, tradeoffs=[{"metric": "peak_memory_mb", "direction": "minimize"}])
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    for trial_id in "ab":
        searcher.suggest(trial_id)
    searcher.on_trial_complete("a", {OBJECTIVE: 0.6, "peak_memory_mb": 900.0})
    searcher.on_trial_complete("b", {"step": 5, "eval_loss": 3.0})
    assert [(t.state.name, t.values) for t in study.trials] == [("COMPLETE", [0.6, 900.0]), ("PRUNED", None)]


def test_tpe_lies_about_running_trials_only_when_trials_run_concurrently(tiny_sweep_dict, tmp_path):
    sweep = SweepConfig(**tiny_sweep_dict)
    space = load_space(REPO / "search_spaces" / "qlora.yaml")
    for concurrency, lies in ((1, False), (2, True), (4, True)):
        folder = tmp_path / str(concurrency)
        folder.mkdir()
        sampler = build_searcher(sweep, space, concurrency, folder).searcher._ot_study.sampler
        assert isinstance(sampler, optuna.samplers.TPESampler)
        assert sampler._constant_liar is lies


def test_a_new_tuner_retries_what_a_dead_driver_left_running_and_enqueues_baselines_once(tiny_sweep_dict, tmp_path):
    from qsweep.search.searcher import RETRY_OF, prepare_study

    baselines = [{"lora.r": 8, "training.learning_rate": 1e-3}, {"lora.r": 4, "training.learning_rate": 2e-3}]
    tiny_sweep_dict["search"].update(baselines=baselines)
    sweep = SweepConfig(**tiny_sweep_dict)
    assert prepare_study(sweep, tmp_path).total == 0
    searcher = build_searcher(sweep, load_space(REPO / "search_spaces" / "qlora.yaml"), 1, tmp_path).searcher
    for trial_id in "abc":
        searcher.suggest(trial_id)
    searcher.on_trial_complete("a", {OBJECTIVE: 0.5})
    searcher.on_trial_complete("c", {"step": 5, "eval_loss": 2.0})
    # The driver dies here: "b" (the second baseline) is RUNNING in the study and no Ray state exists.
    tried = prepare_study(sweep, tmp_path)
    assert (tried.finished, tried.stopped, tried.failed) == (1, 1, 0)
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [(t.state.name, t.system_attrs.get("fixed_params"), t.user_attrs.get(RETRY_OF)) for t in study.trials]
    assert states == [("COMPLETE", baselines[0], None), ("FAIL", baselines[1], None),
                      ("PRUNED", None, None), ("WAITING", baselines[1], 1)]
    # A second crash before anything ran changes nothing.
    assert prepare_study(sweep, tmp_path) == tried
    assert len(optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{tmp_path}/optuna.db").trials) == 4
