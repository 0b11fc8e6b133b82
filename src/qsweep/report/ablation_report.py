"""The ablation report as people read it: a markdown table, a per-cell bar chart, both logged to MLflow."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qsweep.report.ablation import AblationReport, CellSummary, cell_label, report_to_dict
from qsweep.report.figures import figure, message_plot

REPORT_MD = "ablation_report.md"
REPORT_JSON = "ablation_report.json"
CELLS_PNG = "ablation_cells.png"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def to_markdown(report: AblationReport) -> str:
    ref_label = cell_label(report.reference)
    lines = [f"# Ablation: {report.metric}", "", f"Reference: {ref_label}", "",
             "| cell | seeds | mean | 95% CI | per-seed scores |", "|---|---:|---:|---|---|"]
    for c in report.cells:
        mark = " (reference)" if c.cell == report.reference else ""
        ci = f"[{c.ci_low:.4f}, {c.ci_high:.4f}]" if c.n_seeds > 1 else "n/a (1 seed)"
        scores = ", ".join(f"{s:.4f} (seed {seed})" for s, seed in zip(c.scores, c.seeds))
        lines.append(f"| {cell_label(c.cell)}{mark} | {c.n_seeds} | {c.mean:.4f} | {ci} | {scores} |")
    lines += ["", "| factor | value | vs | diff | 95% CI | p (bootstrap) | p (McNemar) | discordant | items |",
              "|---|---|---|---:|---|---:|---:|---|---:|"]
    for c in report.comparisons:
        disc = f"{c.mcnemar_counts[0]} / {c.mcnemar_counts[1]}" if c.mcnemar_counts else "n/a"
        lines.append(f"| {c.factor} | {c.value} | {c.reference} | {c.diff:+.4f} | [{c.ci_low:+.4f}, {c.ci_high:+.4f}] "
                     f"| {_fmt_p(c.p_bootstrap)} | {_fmt_p(c.p_mcnemar)} | {disc} | {c.n_items} |")
    if not report.comparisons:
        lines.append("| (none) | | | | | | | | |")
    lines += ["", (
        f"Method: cell mean over seeds of the logged {report.metric}, 95% CI Student t over seeds. "
        f"diff = value minus reference, other factors at reference; items averaged over each cell's seeds, "
        f"paired bootstrap over items ({report.n_boot} resamples, seed {report.seed}): percentile CI and "
        f"two-sided p from the null-centred distribution. McNemar: exact two-sided binomial on the 0/1 items "
        f"of the lowest seed both cells ran (discordant = value right & reference wrong / the reverse).")]
    if report.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"



def _tick_label(cell: Mapping[str, str], width: int = 16) -> str:
    """Values only (the x-axis label names the factors), wrapped so long lists stay readable."""
    return "\n".join(textwrap.fill(v.replace(",", ", "), width) for v in cell.values())


def _y_limits(cells: list[CellSummary]) -> tuple[float, float]:
    """Bars start at 0; a metric whose scores all lie in [0, 1] (acc, exact_match) is drawn on
    [0, 1], so a wide few-seed t interval cannot squash the bars into a strip."""
    scores = [s for c in cells for s in c.scores]
    low = min([c.ci_low for c in cells] + scores + [0.0])
    high = max([c.ci_high for c in cells] + scores)
    if 0.0 <= min(scores) and max(scores) <= 1.0:
        return 0.0, min(high + 0.08, 1.0)
    return low, high + 0.1 * (high - low or 1.0)


def plot_cells(report: AblationReport, path: Path | str) -> Path:
    """One idea: how each cell scores, with its uncertainty over seeds."""
    path = Path(path)
    cells = report.cells
    if not cells:
        return message_plot(path, f"{report.metric} per cell", "No cell has a finished run.")
    multi_seed = any(c.n_seeds > 1 for c in cells)
    fig = figure(max(6.0, 1.25 * len(cells) + 2.5), 4.8)
    ax = fig.add_subplot()
    x = np.arange(len(cells))
    errors = np.array([[c.mean - c.ci_low for c in cells], [c.ci_high - c.mean for c in cells]])
    colors = ["#4c72b0" if c.cell != report.reference else "#8c8c8c" for c in cells]
    ax.bar(x, [c.mean for c in cells], yerr=errors if multi_seed else None, capsize=6, color=colors,
           edgecolor="black", linewidth=0.6, error_kw={"elinewidth": 1.2})
    low, high = _y_limits(cells)
    for i, c in enumerate(cells):
        if c.n_seeds > 1:
            ax.scatter(np.full(len(c.scores), i) + np.linspace(-0.15, 0.15, len(c.scores)), c.scores, s=18,
                       color="black", zorder=3)
        # At the bar's base, boxed: clear of error bars and seed dots, and readable on any bar height.
        ax.annotate(f"{c.mean:.3f}", (i, max(low, 0.0)), xytext=(0, 4), textcoords="offset points", ha="center",
                    va="bottom", fontsize=9, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none"})
    ax.set_xticks(x, [_tick_label(c.cell) for c in cells], fontsize=9)
    ax.set_xlabel(" / ".join(report.factors) + "   (grey bar: reference)")
    ax.set_ylabel(report.metric)
    ax.set_ylim(low, high)
    seeds = sorted({c.n_seeds for c in cells})
    seed_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    title = f"{report.metric} per cell: mean of {seed_text} seed(s)"
    if multi_seed:
        title += " with 95% CI (dots: one seed each)"
        if any(c.ci_low < low or c.ci_high > high for c in cells):
            title += "\nsome CIs run past the axis: with few seeds the t interval is wide"
    else:
        title += ", no CI with one seed"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.savefig(path)
    return path



def log_report(mlflow_client: Any, run_id: str, report: AblationReport, folder: Path | str) -> list[Path]:
    """Writes the markdown, JSON and plot to `folder` and logs them to the run under `ablation/`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_MD).write_text(to_markdown(report))
    (folder / REPORT_JSON).write_text(json.dumps(report_to_dict(report), indent=2))
    files = [folder / REPORT_MD, folder / REPORT_JSON, plot_cells(report, folder / CELLS_PNG)]
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), artifact_path="ablation")
    return files

