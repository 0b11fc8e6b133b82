"""The `qsweep` command. User errors exit with code 2 and a message, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from qsweep.config import SweepConfig, SweepFileError, load_sweep

app = typer.Typer(add_completion=False, no_args_is_help=True, help="QLoRA hyperparameter sweeps.")
# Piped output (logs, CI) would otherwise be squeezed into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def fail(problems: list[str], source: str | None = None) -> None:
    errors.print(f"[bold red]{source or 'qsweep'}: {len(problems)} problem(s)[/]")
    for problem in problems:
        errors.print(f"  - {problem}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def load_and_validate(path: Path) -> tuple[SweepConfig, object]:
    from qsweep.validate import validate_sweep

    try:
        sweep = load_sweep(path)
        return sweep, validate_sweep(sweep, str(path))
    except SweepFileError as exc:
        fail(exc.problems, exc.source)
        raise  # unreachable: fail exits


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log every trial event")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qsweep").setLevel(logging.INFO)


@app.command()
def validate(sweep_file: Path = typer.Argument(..., help="sweep YAML")) -> None:
    """Check a sweep file and everything it names, without training."""
    sweep, _ = load_and_validate(sweep_file)
    console.print(f"[green]{sweep_file}: valid[/] ({sweep.search.num_trials} trials of {sweep.model.name})")


def run_or_resume(sweep_file: Path, address: str | None, must_resume: bool) -> None:
    from qsweep.leaderboard import build_leaderboard, to_table
    from qsweep.state import output_folder, read_state
    from qsweep.sweep import run_sweep

    sweep, space = load_and_validate(sweep_file)
    if must_resume and read_state(output_folder(sweep)) is None:
        fail([f"output_dir: nothing to resume in {output_folder(sweep)}; start it with `qsweep run {sweep_file}`"],
             str(sweep_file))
    console.print(f"[bold]{sweep.name}[/]: {sweep.search.num_trials} trials of {sweep.model.name}, "
                  f"ranked by {sweep.search.metric}")
    try:
        summary = run_sweep(sweep, sweep_file, space, address=address)
    except SweepFileError as exc:
        fail(exc.problems, exc.source)
    console.print(f"finished {summary.finished}, stopped early {summary.stopped}, failed {summary.failed}")
    if summary.gave_up:
        errors.print(f"[bold red]{summary.gave_up}[/]")
    base = summary.baseline.get(sweep.search.metric)
    if base is not None:
        console.print(f"untuned base model: {sweep.search.metric} = {base:.4f}")
    if summary.best:
        console.print(f"best trial {summary.best['trial_id']}: {sweep.search.metric} = {summary.best['objective']:.4f}")
        console.print(to_table(build_leaderboard(sweep.tracking.uri, sweep.tracking.experiment, top=10)))
    console.print(f"open it: mlflow ui --backend-store-uri {sweep.tracking.uri}")
    if not summary.finished:
        raise typer.Exit(code=1)


@app.command()
def run(
    sweep_file: Path = typer.Argument(..., help="sweep YAML, e.g. sweeps/quickstart.yaml"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (ray://HOST:PORT or auto)"),
) -> None:
    """Validate, then run the sweep (or resume it if it was interrupted) and print its leaderboard."""
    run_or_resume(sweep_file, address, must_resume=False)


@app.command()
def resume(
    sweep_file: Path = typer.Argument(..., help="the sweep YAML that was interrupted"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (ray://HOST:PORT or auto)"),
) -> None:
    """Continue an interrupted sweep: finished trials are kept, interrupted ones retried."""
    run_or_resume(sweep_file, address, must_resume=True)


@app.command()
def leaderboard(
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment (default: the latest sweep's)"),
    metric: Optional[str] = typer.Option(None, help="TASK/METRIC to rank by (default: the sweep's metric)"),
    top: int = typer.Option(10, min=1, help="rows to show"),
    format: Format = typer.Option(Format.table, "--format", help="table, json or csv"),
    tracking_uri: str = typer.Option(
        os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"), "--tracking-uri", help="MLflow tracking URI"
    ),
) -> None:
    """Best finished trials first, with their key params and scores."""
    from qsweep.leaderboard import LeaderboardError, build_leaderboard, to_csv, to_json, to_table

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        fail([f"--tracking-uri: {tracking_uri} does not exist here; run a sweep first or pass --tracking-uri"])
    try:
        board = build_leaderboard(tracking_uri, experiment, metric, top)
    except LeaderboardError as exc:
        fail([str(exc)])
    if format is Format.table:
        console.print(to_table(board))
    else:
        sys.stdout.write(to_json(board) + "\n" if format is Format.json else to_csv(board))


@app.command()
def reproduce(
    run_id: str = typer.Argument(..., help="a finished trial's MLflow run id (see `qsweep leaderboard`)"),
    tracking_uri: str = typer.Option(
        os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"), "--tracking-uri", help="MLflow tracking URI"
    ),
) -> None:
    """Reload a trial's adapter onto its logged base and quantization, re-score it, compare."""
    from rich.table import Table

    from qsweep.evaluate import evaluate_model, include_dirs
    from qsweep.replay import ProvenanceError, fetch_logged_trial, load_trained

    try:
        logged = fetch_logged_trial(tracking_uri, run_id)
        base_dir = Path(logged.provenance.get("base_dir", "."))
        model, tokenizer = load_trained(logged.trial, logged.provenance, logged.adapter_dir, base_dir)
    except ProvenanceError as exc:
        fail([str(exc)])
    evaluation = logged.trial.evaluation
    scores = evaluate_model(model, tokenizer, evaluation.tasks, include_dirs(evaluation.include_path, base_dir),
                            num_fewshot=evaluation.num_fewshot, limit=evaluation.limit,
                            batch_size=evaluation.batch_size).scores
    table = Table(title=f"run {run_id}: logged vs reproduced")
    for column in ("metric", "logged", "reproduced"):
        table.add_column(column)
    for name, value in sorted(scores.items()):
        logged_value = logged.metrics.get(name)
        table.add_row(name, "-" if logged_value is None else f"{logged_value:.4f}", f"{value:.4f}")
    console.print(table)
