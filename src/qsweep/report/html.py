"""The sweep report: one self-contained HTML file, readable without a network or a server.

Everything comes from what the sweep already recorded: its MLflow runs (leaderboard, loss
curves, baselines, the ablation tables) and its Optuna study (parallel coordinates, parameter
importances). plotly.js is inlined once, so the file opens anywhere, offline. At the end of a
sweep the report goes to the output folder and to the parent run, and the leaderboard becomes the
parent run's description in MLflow's UI.
"""

from __future__ import annotations

import html
import logging
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qsweep import tracking
from qsweep.report import html_figures as figures
from qsweep.report import insight
from qsweep.report.ablation_report import REPORT_MD
from qsweep.report.leaderboard import KEY_PARAMS, Leaderboard, build_leaderboard, to_markdown

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
ABLATION_MD = f"ablation/{REPORT_MD}"
# Every finished trial goes on the plots, not just the leaderboard's usual top ten.
ALL_ROWS = 100_000


@dataclass
class SweepRecord:
    """What the report reads: the sweep's parent run, its trials' runs, and its output folder
    (None when it is not on this machine; the Optuna plots then say so)."""

    uri: str
    experiment: str
    parent: Any
    trials: list[Any]
    folder: Path | None

    @property
    def name(self) -> str:
        return self.parent.data.tags.get("qsweep.sweep", self.parent.info.run_name)


@dataclass
class Section:
    title: str
    body: str


def load_record(uri: str, parent_run_id: str, folder: Path | None) -> SweepRecord:
    mlflow_client = tracking.client(uri)
    parent = mlflow_client.get_run(parent_run_id)
    experiment = mlflow_client.get_experiment(parent.info.experiment_id).name
    trials = list(tracking.trial_runs(mlflow_client, parent.info.experiment_id, parent_run_id).values())
    return SweepRecord(uri, experiment, parent, trials, folder)


def leaderboard(record: SweepRecord) -> Leaderboard:
    return build_leaderboard(record.uri, record.experiment, top=ALL_ROWS, sweep=record.name)


def baselines(record: SweepRecord, metric: str) -> dict[str, float]:
    """The untuned base's score per 4-bit type, as stages.log_baselines logged it."""
    suffix = f"/{metric}"
    return {key.removeprefix("baseline/").removesuffix(suffix): value
            for key, value in record.parent.data.metrics.items()
            if key.startswith("baseline/") and key.endswith(suffix) and key.count("/") == metric.count("/") + 2}


def asha_rungs(params: dict[str, str]) -> list[int]:
    """The steps where ASHA compared trials (Ray's milestones: grace × factor^k below max_steps)."""
    if params.get("search.asha.enabled") != "True":
        return []
    grace, factor = int(params["search.asha.grace_steps"]), float(params["search.asha.reduction_factor"])
    # The longest trial's steps (logged since trials may train for epochs), else the base trial's.
    max_steps = int(params.get("search.asha.max_t") or params["training.max_steps"])
    count = int(math.log(max_steps / grace) / math.log(factor) + 1)
    return sorted({int(grace * factor**k) for k in range(count)} - {max_steps})


def curves(record: SweepRecord) -> list[figures.Curve]:
    mlflow_client = tracking.client(record.uri)
    found = []
    for run in sorted(record.trials, key=lambda r: r.info.start_time):
        by_step = {m.step: m.value for m in mlflow_client.get_metric_history(run.info.run_id, "eval_loss")}
        steps = sorted(by_step)
        found.append(figures.Curve(run.info.run_name, run.data.tags.get("qsweep.outcome", "running"), steps,
                                   [by_step[s] for s in steps]))
    return found


def study(record: SweepRecord) -> Any | None:
    if record.folder is None or not (record.folder / "optuna.db").exists():
        return None
    return insight.load_study(record.folder, record.name)


def ablation_markdown(record: SweepRecord) -> str | None:
    """The ablation tables `qsweep ablate` logged to the parent run, when it is an ablation."""
    mlflow_client = tracking.client(record.uri)
    logged = {a.path for a in mlflow_client.list_artifacts(record.parent.info.run_id, "ablation")}
    if ABLATION_MD not in logged:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(mlflow_client.download_artifacts(record.parent.info.run_id, ABLATION_MD, tmp)).read_text()


def markdown_html(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _figure_html(fig: Any, first: bool) -> str:
    # The first figure carries plotly.js itself (offline bundle); the others reuse it.
    return fig.to_html(full_html=False, include_plotlyjs=first, config={"displaylogo": False, "responsive": True})


def optuna_figures(record: SweepRecord, metric: str) -> tuple[list[tuple[str, Any]], list[Section]]:
    """Parallel coordinates and importances from the study; a note where one cannot be drawn."""
    from optuna.trial import TrialState

    optuna_study = study(record)
    if optuna_study is None:
        return [], [Section("Parameters", _note(
            "The sweep's Optuna study (OUTPUT_DIR/NAME/optuna.db) is not on this machine: run the report where "
            "the sweep ran for the parallel coordinates and the parameter importances."))]
    if not optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return [], [Section("Parameters", _note("No trial of the Optuna study finished with a score."))]
    figs = [("Parameters against score", figures.parallel_figure(optuna_study, metric))]
    if len(optuna_study.directions) > 1:
        return figs, [Section("Parameter importances", _note("Not computed: the sweep has several objectives."))]
    found = insight.search_insight(optuna_study)
    if not found["importances"]:
        return figs, [Section("Parameter importances", _note(f"Not computed: {found['note']}."))]
    figs.append(("Parameter importances", figures.importance_figure(found["importances"], found["evaluator"],
                                                                     metric)))
    return figs, []


def sections(record: SweepRecord) -> list[Section]:
    board = leaderboard(record)
    metric = board.metric
    figs: list[tuple[str, Any]] = []
    if board.rows:
        figs.append(("Pareto: score against peak memory and train time",
                     figures.pareto_figure(board.rows, metric, baselines(record, metric), list(KEY_PARAMS))))
    optuna_figs, notes = optuna_figures(record, metric)
    figs += optuna_figs
    trial_curves = curves(record)
    if any(c.steps for c in trial_curves):
        figs.append(("Validation loss", figures.curves_figure(trial_curves, asha_rungs(record.parent.data.params))))
    body = markdown_html(to_markdown(board)) if board.rows else _note("No trial finished with a score.")
    found = [Section("Leaderboard", body),
             *(Section(title, _figure_html(fig, first=i == 0)) for i, (title, fig) in enumerate(figs)), *notes]
    if (tables := ablation_markdown(record)) is not None:
        found.append(Section("Ablation", markdown_html(tables)))
    return found


def _summary(record: SweepRecord) -> str:
    outcomes: dict[str, int] = {}
    for run in record.trials:
        outcome = run.data.tags.get("qsweep.outcome", "running")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())) or "no trials"
    tags = record.parent.data.tags
    return (f"<p>Experiment <b>{html.escape(record.experiment)}</b>, parent run "
            f"<code>{record.parent.info.run_id}</code> ({html.escape(record.parent.info.status)}). "
            f"Ranked by <b>{html.escape(tags.get('qsweep.metric', '?'))}</b> "
            f"({html.escape(tags.get('qsweep.direction', 'maximize'))}). Trials: {html.escape(counts)}.</p>")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; display: block; overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; } th { background: #f3f3f3; }
.note { color: #666; font-style: italic; } code { font-size: 0.9em; }
"""


def render(record: SweepRecord) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = "".join(f"<section><h2>{html.escape(s.title)}</h2>{s.body}</section>" for s in sections(record))
    title = f"qsweep report: {html.escape(record.name)}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>{_summary(record)}"
            f'<p class="note">Written {stamp} from the MLflow store and the Optuna study.</p>{parts}</body></html>')


def write_report(record: SweepRecord, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(record), encoding="utf-8")
    return path


def publish(uri: str, parent_run_id: str, folder: Path) -> Path:
    """Writes the report into the output folder, logs it to the parent run, and makes the
    leaderboard the parent run's description."""
    record = load_record(uri, parent_run_id, folder)
    path = write_report(record, folder / REPORT_FILE)
    mlflow_client = tracking.client(uri)
    mlflow_client.log_artifact(parent_run_id, str(path))
    description = to_markdown(leaderboard(record)) + f"\nFull report: the `{REPORT_FILE}` artifact of this run.\n"
    mlflow_client.set_tag(parent_run_id, tracking.DESCRIPTION_TAG, description)
    return path


def publish_at_end(uri: str, parent_run_id: str, folder: Path) -> None:
    """The end-of-sweep hook: the report is a by-product, so failing it must not fail the sweep
    whose trials are already recorded."""
    try:
        path = publish(uri, parent_run_id, folder)
    except Exception:  # noqa: BLE001
        logger.warning("the sweep report could not be written", exc_info=True)
        return
    logger.info("sweep report: %s", path)
