"""Search insight on toy Optuna studies: importances, history, the PNGs and the MLflow artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qsweep.report import insight as insight_module

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 2000


# --------------------------------------------------------------------------- search insight


def toy_study(n_trials: int, prune_every: int = 0):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        x = trial.suggest_float("training.learning_rate", 1e-5, 1e-3, log=True)
        r = trial.suggest_categorical("lora.r", [8, 16, 32])
        dropout = trial.suggest_float("lora.dropout", 0.0, 0.2)
        if prune_every and trial.number % prune_every == prune_every - 1:
            raise optuna.TrialPruned()
        return -(math.log10(x) + 4) ** 2 + 0.01 * (r == 16) + 0.001 * dropout

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=n_trials)
    return study


def test_search_insight_importances_sum_to_one_and_history_is_monotone(tmp_path: Path):
    study = toy_study(20, prune_every=5)
    insight = insight_module.search_insight(study)
    assert insight["n_trials"] == 20 and insight["n_complete"] == 16
    assert insight["evaluator"] in ("fanova", "ped_anova")
    assert set(insight["importances"]) == {"training.learning_rate", "lora.r", "lora.dropout"}
    assert sum(insight["importances"].values()) == pytest.approx(1.0, abs=1e-6)
    assert max(insight["importances"], key=insight["importances"].get) == "training.learning_rate"
    best = [t["best_so_far"] for t in insight["trials"] if t["value"] is not None]
    assert best == sorted(best) and best[-1] == pytest.approx(study.best_value)
    assert [t["state"] for t in insight["trials"]].count("PRUNED") == 4
    json.dumps(insight)
    assert is_png(insight_module.plot_importances(insight, tmp_path / "importance.png", "zorble/acc"))
    assert is_png(insight_module.plot_history(study, tmp_path / "history.png", "zorble/acc"))


def test_search_insight_without_scikit_learn_uses_ped_anova(monkeypatch: pytest.MonkeyPatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    insight = insight_module.search_insight(toy_study(20))
    assert insight["evaluator"] == "ped_anova"
    assert sum(insight["importances"].values()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n_trials", [0, 1])
def test_search_insight_on_a_study_too_small_for_importances(tmp_path: Path, n_trials: int):
    study = toy_study(n_trials)
    insight = insight_module.search_insight(study)
    assert insight["importances"] == {} and insight["evaluator"] is None
    assert "at least 2" in insight["note"]
    assert is_png(insight_module.plot_importances(insight, tmp_path / "importance.png"))
    assert is_png(insight_module.plot_history(study, tmp_path / "history.png"))


def test_log_search_insight_logs_three_artifacts(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("s", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id).info.run_id
    insight_module.log_search_insight(client, parent, toy_study(6), tmp_path / "insight", "zorble/acc")
    logged = {f.path for f in client.list_artifacts(parent, "search_insight")}
    assert logged == {f"search_insight/{name}" for name in
                      (insight_module.INSIGHT_JSON, insight_module.IMPORTANCE_PNG, insight_module.HISTORY_PNG)}


def test_search_insight_of_a_multi_objective_study_ranks_by_the_first_objective(tmp_path: Path):
    """search.tradeoffs makes a multi-objective study: insight follows the ranked (first) objective."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        x = trial.suggest_float("training.learning_rate", 1e-5, 1e-3, log=True)
        r = trial.suggest_categorical("lora.r", [8, 16, 32])
        return -(math.log10(x) + 4) ** 2, float(r)

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=8)
    found = insight_module.search_insight(study)
    scores = [t.values[0] for t in sorted(study.trials, key=lambda t: t.number)]
    assert found["direction"] == "maximize"
    assert [t["value"] for t in found["trials"]] == scores
    assert [t["best_so_far"] for t in found["trials"]] == [max(scores[: i + 1]) for i in range(len(scores))]
    assert set(found["importances"]) == {"training.learning_rate", "lora.r"}
    assert is_png(insight_module.plot_history(study, tmp_path / "history.png", "zorble/acc"))
