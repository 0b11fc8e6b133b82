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
