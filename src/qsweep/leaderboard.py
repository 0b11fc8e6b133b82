"""The leaderboard: finished trials from MLflow, best first, with their key params and scores."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

from qsweep import tracking

KEY_PARAMS = {
    "quant": "quantization.quant_type",
    "dq": "quantization.double_quant",
    "r": "lora.r",
    "alpha": "lora.alpha",
    "dropout": "lora.dropout",
    "targets": "lora.target_modules",
    "lr": "training.learning_rate",
}
MEASURES = {"peak_mb": "peak_memory_mb", "train_s": "train_seconds", "tok/s": "tokens_per_second"}


class LeaderboardError(ValueError):
    pass


@dataclass
class Leaderboard:
    experiment: str
    metric: str
    direction: str
    baseline: float | None
    rows: list[dict[str, Any]]


def latest_experiment(mlflow_client: Any) -> str:
    sweeps = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string="tags.`qsweep.kind` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not sweeps:
        raise LeaderboardError("no qsweep sweep in this tracking store; run `qsweep run SWEEP.yaml` first")
    return mlflow_client.get_experiment(sweeps[0].info.experiment_id).name


def _latest_sweep_run(mlflow_client: Any, experiment_id: str) -> Any:
    runs = mlflow_client.search_runs([experiment_id], filter_string="tags.`qsweep.kind` = 'sweep'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def build_leaderboard(uri: str, experiment: str | None = None, metric: str | None = None, top: int = 10) -> Leaderboard:
    mlflow_client = tracking.client(uri)
    experiment = experiment or latest_experiment(mlflow_client)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in mlflow_client.search_experiments())
        raise LeaderboardError(f"--experiment {experiment!r} does not exist; known: {names or 'none'}")
    sweep_run = _latest_sweep_run(mlflow_client, found.experiment_id)
    tags = sweep_run.data.tags if sweep_run else {}
    metric = metric or tags.get("qsweep.metric")
    if not metric:
        raise LeaderboardError("no metric to rank by; pass --metric TASK/METRIC")
    direction = tags.get("qsweep.direction", "maximize")
    order = "DESC" if direction == "maximize" else "ASC"
    runs = mlflow_client.search_runs(
        [found.experiment_id],
        filter_string="tags.`qsweep.kind` = 'trial' and attributes.status = 'FINISHED'",
        order_by=[f"metrics.`{metric}` {order}"],
        max_results=max(top, 1) * 4,
    )
    rows = [_row(run, metric) for run in runs if metric in run.data.metrics][:top]
    baseline = sweep_run.data.metrics.get(f"baseline/{metric}") if sweep_run else None
    return Leaderboard(experiment, metric, direction, baseline, rows)


def _row(run: Any, metric: str) -> dict[str, Any]:
    metrics, params = run.data.metrics, run.data.params
    row: dict[str, Any] = {"run_id": run.info.run_id, "trial": run.data.tags.get("qsweep.trial_id", "")}
    row[metric] = metrics[metric]
    row["stderr"] = metrics.get(f"{metric}_stderr")
    row.update({label: params.get(key) for label, key in KEY_PARAMS.items()})
    row.update({label: metrics.get(key) for label, key in MEASURES.items()})
    return row


def to_json(board: Leaderboard) -> str:
    return json.dumps({"experiment": board.experiment, "metric": board.metric, "baseline": board.baseline,
                       "rows": board.rows}, indent=2)


def to_csv(board: Leaderboard) -> str:
    out = io.StringIO()
    if board.rows:
        writer = csv.DictWriter(out, fieldnames=list(board.rows[0]))
        writer.writeheader()
        writer.writerows(board.rows)
    return out.getvalue()


def to_table(board: Leaderboard) -> Any:
    """Compact for a terminal: score ± stderr in one column, 3 significant digits."""
    from rich.table import Table

    baseline = f", untuned base {board.baseline:.3f}" if board.baseline is not None else ""
    table = Table(title=f"{board.experiment}: {board.metric} ({board.direction}){baseline}")
    columns = ["run", board.metric, *KEY_PARAMS, *MEASURES]
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in board.rows:
        score = f"{row[board.metric]:.3f}" + (f" ± {row['stderr']:.3f}" if row["stderr"] is not None else "")
        cells = [row["run_id"], score, *(_cell(row[c]) for c in KEY_PARAMS), *(_cell(row[c]) for c in MEASURES)]
        table.add_row(*cells)
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            value = float(value) if any(ch in value for ch in ".e") else value
        except ValueError:
            return value
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
