"""Search insight of a finished sweep: Optuna's parameter importances and optimization history.

Read from the sweep's own Optuna study (`OUTPUT_DIR/NAME/optuna.db`), written as JSON and PNGs and
logged on the parent run under `search_insight/`. A by-product: failing here never fails a sweep.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from qsweep.report.figures import figure, message_plot

logger = logging.getLogger(__name__)

INSIGHT_JSON = "search_insight.json"
IMPORTANCE_PNG = "param_importances.png"
HISTORY_PNG = "optimization_history.png"


def _evaluator() -> tuple[Any, str]:
    """fANOVA (Optuna's default, seeded) when scikit-learn is there, which MLflow pulls in;
    PED-ANOVA, which needs nothing beyond Optuna and numpy, otherwise."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    try:
        import sklearn  # noqa: F401
    except ImportError:
        return PedAnovaImportanceEvaluator(), "ped_anova"
    return FanovaImportanceEvaluator(seed=0), "fanova"


def _json_safe(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _ranked_value(trial: Any) -> float:
    """The value the sweep ranks by: with search.tradeoffs (several objectives) it is the first."""
    return trial.values[0]


def _history(study: Any) -> tuple[str, list[dict[str, Any]]]:
    """(direction, one entry per trial in order) with the best complete value so far."""
    import optuna
    from optuna.trial import TrialState

    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    trials, best = [], None
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        value = _ranked_value(t) if t.state == TrialState.COMPLETE else None
        if value is not None:
            best = value if best is None else (max(best, value) if maximize else min(best, value))
        trials.append({"number": t.number, "state": t.state.name, "value": value,
                       "best_so_far": best if value is not None else None,
                       "params": {k: _json_safe(v) for k, v in t.params.items()}})
    return ("maximize" if maximize else "minimize"), trials


def search_insight(study: Any) -> dict[str, Any]:
    """Parameter importances and per-trial history of the ranked objective, JSON-ready."""
    import optuna

    direction, trials = _history(study)
    complete = sum(1 for t in trials if t["value"] is not None)
    evaluator, name = _evaluator()
    importances: dict[str, float] = {}
    note = ""
    if complete < 2:
        note = f"only {complete} complete trial(s), and importances need at least 2"
        name = None
    else:
        try:
            # Optuna asks for a target on a multi-objective study: the ranked objective.
            target = _ranked_value if len(study.directions) > 1 else None
            raw = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
            importances = {k: float(v) for k, v in raw.items()}
        # Insight is a by-product of a finished sweep: failing here must not fail the sweep.
        except Exception as exc:  # noqa: BLE001
            logger.warning("parameter importances failed: %s", exc)
            note = f"importances failed: {exc}"
        if not importances and not note:
            note = "no parameter varied across the complete trials"
    return {"study": study.study_name, "direction": direction, "evaluator": name, "n_trials": len(trials),
            "n_complete": complete, "importances": importances, "note": note, "trials": trials}


EVALUATOR_LABELS = {"fanova": "fANOVA importance (share of objective variance)",
                    "ped_anova": "PED-ANOVA importance (normalized to sum 1)"}


def plot_importances(insight: Mapping[str, Any], path: Path | str, metric: str = "objective") -> Path:
    """One idea: which hyperparameters moved the objective, largest on top."""
    path = Path(path)
    importances = insight["importances"]
    if not importances:
        return message_plot(path, f"Parameter importances for {metric}",
                             f"Not computed: {insight.get('note') or 'no importances'}.")
    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    fig = figure(7.0, max(2.8, 0.45 * len(names) + 1.6))
    ax = fig.add_subplot()
    ax.barh(names, values, color="#4c72b0", edgecolor="black", linewidth=0.6)
    for y, v in enumerate(values):
        ax.annotate(f"{v:.1%}", (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=9)
    from matplotlib.ticker import PercentFormatter

    ax.set_xlim(0, max(values) * 1.18 or 1.0)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(EVALUATOR_LABELS.get(insight.get("evaluator") or "", "importance"))
    ax.set_ylabel("hyperparameter")
    ax.set_title(f"Hyperparameter importance for {metric}\n(from {insight['n_complete']} complete trials)",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(path)
    return path


def plot_history(study: Any, path: Path | str, metric: str = "objective") -> Path:
    """One idea: how the objective evolved over trials, with the best value found so far."""
    path = Path(path)
    direction, trials = _history(study)
    scored = [t for t in trials if t["value"] is not None]
    unscored = len(trials) - len(scored)
    if not scored:
        return message_plot(path, f"Optimization history of {metric}",
                             f"No trial finished with a score ({len(trials)} trial(s) in the study).")
    fig = figure(7.5, 4.5)
    ax = fig.add_subplot()
    numbers = [t["number"] for t in scored]
    ax.scatter(numbers, [t["value"] for t in scored], s=24, color="#4c72b0", label="trial score", zorder=3)
    ax.step(numbers, [t["best_so_far"] for t in scored], where="post", color="#dd8452", linewidth=2,
            label=f"best so far ({direction})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers are whole
    ax.set_xlabel("trial number")
    ax.set_ylabel(metric)
    extra = f", {unscored} stopped early or failed (no score)" if unscored else ""
    ax.set_title(f"Optimization history of {metric}: {len(scored)} scored trials{extra}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.savefig(path)
    return path



def log_search_insight(mlflow_client: Any, run_id: str, study: Any, folder: Path | str,
                       metric: str = "objective") -> dict[str, Any]:
    """Writes importances (JSON + PNG) and history (PNG) and logs them under `search_insight/`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    insight = search_insight(study)
    (folder / INSIGHT_JSON).write_text(json.dumps(insight, indent=2))
    files = [folder / INSIGHT_JSON, plot_importances(insight, folder / IMPORTANCE_PNG, metric),
             plot_history(study, folder / HISTORY_PNG, metric)]
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), artifact_path="search_insight")
    return insight


def load_study(folder: Path | str, name: str) -> Any:
    """The sweep's Optuna study as qsweep.search.searcher.build_searcher stores it: `<folder>/optuna.db`,
    named after the sweep."""
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path(folder) / 'optuna.db'}")
