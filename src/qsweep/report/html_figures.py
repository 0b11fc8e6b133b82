"""The HTML sweep report's plots, as plotly figures: one idea per figure, drawn by plotly and Optuna.

Inputs are plain data (leaderboard rows, loss curves, the Optuna study, importances), so each
figure is testable without MLflow and the page (qsweep.report.html) only lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

FRONT_COLOR = "#dd8452"
OTHER_COLOR = "#4c72b0"
STOP_COLOR = "#c44e52"
FAIL_COLOR = "#222222"
# Trials that ended early for a reason of their own, not ASHA's (see tracking.ray_callback).
FAILED_OUTCOMES = {"error", "oom", "diverged", "crashed", "timeout"}


@dataclass(frozen=True)
class Curve:
    """One trial's validation loss by step, and how the trial ended."""

    name: str
    outcome: str
    steps: list[int]
    losses: list[float]


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.01}, template="plotly_white", height=height,
                      margin={"l": 60, "r": 30, "t": 60, "b": 50}, legend={"orientation": "h", "y": -0.2})
    return fig


def _hover(row: Mapping[str, Any], metric: str, keys: Sequence[str]) -> str:
    params = "<br>".join(f"{k} = {row.get(k)}" for k in keys if row.get(k) is not None)
    return f"trial {row.get('trial')}<br>{metric} = {row[metric]:.4g}<br>{params}"


def pareto_figure(rows: Sequence[Mapping[str, Any]], metric: str, baselines: Mapping[str, float],
                  keys: Sequence[str]) -> go.Figure:
    """Score against peak memory and against train time; the Pareto front highlighted and the
    untuned base's score per 4-bit type as dashed lines."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("peak memory (MiB)", "train time (s)"))
    for front, color, label in ((True, FRONT_COLOR, "Pareto front"), (False, OTHER_COLOR, "dominated")):
        chosen = [r for r in rows if bool(r.get("pareto")) == front]
        for col, measure in ((1, "peak_mb"), (2, "train_s")):
            fig.add_trace(go.Scatter(
                x=[r[measure] for r in chosen], y=[r[metric] for r in chosen], mode="markers",
                marker={"color": color, "size": 11, "symbol": "star" if front else "circle",
                        "line": {"width": 1, "color": "black"}},
                name=label, legendgroup=label, showlegend=col == 1,
                text=[_hover(r, metric, keys) for r in chosen], hoverinfo="text",
            ), row=1, col=col)
    for quant, value in baselines.items():
        fig.add_hline(y=value, line_dash="dash", line_color="grey", row="all", col="all",
                      annotation_text=f"untuned base ({quant}) {value:.3g}", annotation_position="bottom right")
    fig.update_yaxes(title_text=metric, row=1, col=1)
    return _layout(fig, f"{metric} against cost: the front no other trial beats on score, memory and time at once")


def curves_figure(curves: Sequence[Curve], asha_rungs: Sequence[int] = ()) -> go.Figure:
    """Every trial's validation loss; where ASHA stopped a trial, or a trial failed, its last point
    is marked."""
    fig = go.Figure()
    for curve in curves:
        fig.add_trace(go.Scatter(x=curve.steps, y=curve.losses, mode="lines+markers", name=curve.name,
                                 marker={"size": 5}, hovertemplate=f"{curve.name}<br>step %{{x}}: %{{y:.4f}}"
                                                                   "<extra></extra>"))
    for outcomes, label, color, symbol in (({"stopped"}, "stopped by ASHA", STOP_COLOR, "x"),
                                           (FAILED_OUTCOMES, "failed", FAIL_COLOR, "triangle-up")):
        ends = [c for c in curves if c.outcome in outcomes and c.steps]
        if ends:
            fig.add_trace(go.Scatter(
                x=[c.steps[-1] for c in ends], y=[c.losses[-1] for c in ends], mode="markers", name=label,
                marker={"color": color, "size": 14, "symbol": symbol, "line": {"width": 2, "color": color}},
                text=[f"{c.name}: {label} at step {c.steps[-1]}" for c in ends], hoverinfo="text",
            ))
    for rung in asha_rungs:
        fig.add_vline(x=rung, line_dash="dot", line_color="lightgrey")
    fig.update_xaxes(title_text="step" + (" (dotted: ASHA's rungs)" if asha_rungs else ""))
    fig.update_yaxes(title_text="validation loss")
    return _layout(fig, "Validation loss of every trial", height=480)


def importance_figure(importances: Mapping[str, float], evaluator: str | None, metric: str) -> go.Figure:
    """Optuna's parameter importances, largest on top."""
    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h", marker_color=OTHER_COLOR,
                           text=[f"{importances[n]:.1%}" for n in names], textposition="outside"))
    fig.update_xaxes(title_text=f"importance ({evaluator or 'optuna'})", tickformat=".0%")
    return _layout(fig, f"Which hyperparameters moved {metric}", height=max(260, 60 + 40 * len(names)))


def parallel_figure(study: Any, metric: str) -> go.Figure:
    """Optuna's parallel coordinates: every complete trial's params against its score."""
    import optuna.visualization as vis

    # A study with trade-offs has several objectives; the sweep's metric is the first.
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    fig = vis.plot_parallel_coordinate(study, target=target, target_name=metric)
    return _layout(fig, f"Hyperparameters against {metric} (finished trials)", height=460)
