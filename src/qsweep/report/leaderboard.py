"""The leaderboard: finished trials from MLflow, best first, with their key params and scores."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
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
# MMLU beside the ranked score (a "does not forget" guard): the group and its four categories as
# lm-eval reports them (offline copy or lm-eval's own), and the group's change against the base.
# Scored on every trial (evaluation.tasks) or on the finalists only (evaluation.final.tasks).
MMLU_GROUPS = ("mmlu_offline", "mmlu")
MMLU_CATEGORIES = {"stem": "stem", "hum": "humanities", "soc": "social_sciences", "other": "other"}
MMLU_COLUMNS = ("mmlu", "mmlu_delta", *(f"mmlu_{c}" for c in MMLU_CATEGORIES))
# What a trial the guard was not scored on shows: never a blank, which a spreadsheet reads as 0.
NOT_SCORED = "not scored"


class LeaderboardError(ValueError):
    pass


@dataclass
class Leaderboard:
    experiment: str
    metric: str
    direction: str
    baseline: float | None
    rows: list[dict[str, Any]]
    mmlu: str | None = None
    # "final/" when the guard is scored on the finalists only, else "".
    mmlu_stage: str = ""
    # The untuned base's guard per 4-bit type: each trial's Δ mmlu is against its own type's.
    mmlu_baseline: dict[str, float] = field(default_factory=dict)

    @property
    def mmlu_title(self) -> str:
        return f"{self.mmlu} (final)" if self.mmlu_stage else str(self.mmlu)


def latest_experiment(mlflow_client: Any) -> str:
    sweeps = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string="tags.`qsweep.kind` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not sweeps:
        raise LeaderboardError("no qsweep sweep in this tracking store; run `qsweep run SWEEP.yaml` first")
    return mlflow_client.get_experiment(sweeps[0].info.experiment_id).name


def latest_sweep_run(mlflow_client: Any, experiment_id: str) -> Any:
    runs = mlflow_client.search_runs([experiment_id], filter_string="tags.`qsweep.kind` = 'sweep'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def where_filter(conditions: list[str]) -> str:
    """`quant=nf4`, `lora.r!=8` → an MLflow filter on params; short names are the table's columns."""
    clauses = []
    for condition in conditions:
        operator = "!=" if "!=" in condition else "="
        key, _, value = condition.partition(operator)
        key, value = key.strip(), value.strip()
        if not key or not value:
            raise LeaderboardError(f"--where {condition!r}: write KEY=VALUE or KEY!=VALUE, e.g. quant=nf4")
        param = KEY_PARAMS.get(key, key)
        clauses.append(f"params.`{param}` {operator} '{value}'")
    return "".join(f" and {c}" for c in clauses)


def pareto_front(rows: list[dict[str, Any]], metric: str, direction: str) -> set[str]:
    """Run ids no other run beats on score, peak memory and train time at once."""
    sign = 1 if direction == "maximize" else -1

    def costs(row: dict[str, Any]) -> tuple[float, float, float]:
        return (-sign * row[metric], row["peak_mb"] or float("inf"), row["train_s"] or float("inf"))

    front = set()
    for row in rows:
        mine = costs(row)
        dominated = any(
            all(o <= m for o, m in zip(costs(other), mine)) and costs(other) != mine for other in rows
        )
        if not dominated:
            front.add(row["run_id"])
    return front


def rank_final_first(rows: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Trials re-scored in the final stage rank first, by that score; the rest keep the cheap order."""
    sign = -1 if direction == "maximize" else 1
    rescored = sorted((r for r in rows if r["final"] is not None), key=lambda r: sign * r["final"])
    return rescored + [r for r in rows if r["final"] is None]


def build_leaderboard(uri: str, experiment: str | None = None, metric: str | None = None, top: int = 10,
                      where: list[str] | None = None, sweep: str | None = None) -> Leaderboard:
    mlflow_client = tracking.client(uri)
    experiment = experiment or latest_experiment(mlflow_client)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in mlflow_client.search_experiments())
        raise LeaderboardError(f"--experiment {experiment!r} does not exist; known: {names or 'none'}")
    sweep_run = latest_sweep_run(mlflow_client, found.experiment_id)
    tags = sweep_run.data.tags if sweep_run else {}
    metric = metric or tags.get("qsweep.metric")
    if not metric:
        raise LeaderboardError("no metric to rank by; pass --metric TASK/METRIC")
    direction = tags.get("qsweep.direction", "maximize")
    order = "DESC" if direction == "maximize" else "ASC"
    query = "tags.`qsweep.kind` = 'trial' and attributes.status = 'FINISHED'" + where_filter(where or [])
    if sweep:
        query += f" and tags.`qsweep.sweep` = '{sweep}'"
    runs = mlflow_client.search_runs([found.experiment_id], filter_string=query,
                                     order_by=[f"metrics.`{metric}` {order}"], max_results=5000)
    kept = [run for run in runs if metric in run.data.metrics]
    mmlu, stage = next(((g, stage) for stage in ("", "final/") for g in MMLU_GROUPS
                        if any(f"{stage}{g}/acc" in run.data.metrics for run in kept)), (None, ""))
    rows = rank_final_first([_row(run, metric, mmlu, stage) for run in kept], direction)
    front = pareto_front(rows, metric, direction)
    for row in rows:
        row["pareto"] = row["run_id"] in front
    base_metrics = sweep_run.data.metrics if sweep_run else {}
    suffix = f"/{stage}{mmlu}/acc"
    guard = {k.removeprefix("baseline/").removesuffix(suffix): v for k, v in base_metrics.items()
             if k.startswith("baseline/") and k.endswith(suffix) and k.count("/") == suffix.count("/") + 1}
    return Leaderboard(experiment, metric, direction, base_metrics.get(f"baseline/{metric}"), rows[:top], mmlu,
                       stage, guard)


def _row(run: Any, metric: str, mmlu: str | None, stage: str) -> dict[str, Any]:
    metrics, params = run.data.metrics, run.data.params
    row: dict[str, Any] = {"run_id": run.info.run_id, "trial": run.data.tags.get("qsweep.trial_id", "")}
    row[metric] = metrics[metric]
    row["stderr"] = metrics.get(f"{metric}_stderr")
    row["final"] = metrics.get(f"final/{metric}")
    row["delta"] = metrics.get(f"delta/{metric}")
    row.update({label: params.get(key) for label, key in KEY_PARAMS.items()})
    row.update({label: metrics.get(key) for label, key in MEASURES.items()})
    if mmlu:
        row["mmlu"] = metrics.get(f"{stage}{mmlu}/acc")
        row["mmlu_delta"] = metrics.get(f"delta/{stage}{mmlu}/acc")
        row.update({f"mmlu_{label}": metrics.get(f"{stage}{mmlu}_{c}/acc") for label, c in MMLU_CATEGORIES.items()})
    return row


def to_json(board: Leaderboard) -> str:
    """A guard not scored on a trial is null (JSON's own "no value")."""
    return json.dumps({"experiment": board.experiment, "metric": board.metric, "baseline": board.baseline,
                       "mmlu": board.mmlu, "mmlu_stage": board.mmlu_stage.rstrip("/") or "every trial",
                       "mmlu_baseline": board.mmlu_baseline, "rows": board.rows}, indent=2)


def to_csv(board: Leaderboard) -> str:
    out = io.StringIO()
    if board.rows:
        writer = csv.DictWriter(out, fieldnames=list(board.rows[0]))
        writer.writeheader()
        writer.writerows({**row, **({c: NOT_SCORED for c in MMLU_COLUMNS} if row.get("mmlu", 0) is None else {})}
                         for row in board.rows)
    return out.getvalue()


def _title(board: Leaderboard, experiment: str) -> str:
    baseline = f", untuned base {board.baseline:.3f}" if board.baseline is not None else ""
    if board.mmlu_baseline:
        per_type = ", ".join(f"{quant} {value:.3f}" for quant, value in sorted(board.mmlu_baseline.items()))
        baseline += f" ({board.mmlu_title}: {per_type})"
    return f"{experiment}: {board.metric} ({board.direction}){baseline}"


def to_table(board: Leaderboard) -> Any:
    """Compact for a terminal: score ± stderr in one column, 3 significant digits."""
    from rich.table import Table

    table = Table(title=_title(board, board.experiment))
    for column in _display_columns(board):
        table.add_column(column, no_wrap=True)
    for row in board.rows:
        table.add_row(*_display_cells(board, row, pareto_mark="★"))
    return table


def _display_columns(board: Leaderboard) -> list[str]:
    mmlu = [board.mmlu_title, "Δ mmlu", *MMLU_CATEGORIES] if board.mmlu else []
    return ["run", board.metric, "final", "Δ base", *mmlu, *KEY_PARAMS, *MEASURES, "pareto"]


def _display_cells(board: Leaderboard, row: dict[str, Any], pareto_mark: str) -> list[str]:
    score = f"{row[board.metric]:.3f}" + (f" ± {row['stderr']:.3f}" if row["stderr"] is not None else "")
    mmlu = [NOT_SCORED if row["mmlu"] is None else _cell(row[c]) for c in MMLU_COLUMNS] if board.mmlu else []
    return [row["run_id"], score, _cell(row["final"]), _cell(row["delta"]), *mmlu,
            *(_cell(row[c]) for c in KEY_PARAMS), *(_cell(row[c]) for c in MEASURES),
            pareto_mark if row.get("pareto") else ""]


def to_markdown(board: Leaderboard) -> str:
    columns = _display_columns(board)
    lines = [_title(board, f"**{board.experiment}**"), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_display_cells(board, row, pareto_mark="yes")) + " |" for row in board.rows]
    return "\n".join(lines) + "\n"


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
