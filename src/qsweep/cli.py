"""The `qsweep` command. User errors exit with code 2 and a message, never a traceback.

Longer than 400 lines because it holds one thin typer command per verb (run, resume, status, validate,
preview, leaderboard, report, dashboard, show, reproduce, promote, export, ablate, estimate, calibrate), each a
few lines of argument handling around a call into its stage.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from qsweep.config.schema import SweepConfig, SweepFileError, default_tracking_uri, load_sweep

app = typer.Typer(add_completion=False, no_args_is_help=True, help="QLoRA hyperparameter sweeps.")
# Piped output (logs, CI) would otherwise be squeezed into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True)

# At exit the interpreter's last garbage collection walks every object torch, transformers and
# peft created: 2.3 s after a sweep on two cores. Freezing them first leaves that walk nothing to
# do; each object is still freed (reference counting) and every atexit handler still runs.
atexit.register(gc.freeze)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


def fail(problems: list[str], source: str | None = None) -> None:
    errors.print(f"[bold red]{source or 'qsweep'}: {len(problems)} problem(s)[/]")
    for problem in problems:
        errors.print(f"  - {problem}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def load_and_validate(path: Path, to_run: bool = False) -> tuple[SweepConfig, object]:
    """The sweep and its search space, or exit 2 with every problem. `to_run`: the sweep runs next,
    so what it would build first (its embedded model) is built before validating."""
    from qsweep.preflight.validate import validate_sweep

    try:
        sweep = load_sweep(path)
        if to_run:
            from qsweep.preflight.model import build_embedded_model

            build_embedded_model(sweep)
        return sweep, validate_sweep(sweep, str(path))
    except SweepFileError as exc:
        fail(exc.problems, exc.source)
        raise  # unreachable: fail exits


@app.callback()
def main(ctx: typer.Context,
         verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="Ray's, MLflow's and the libraries' output on the terminal too")) -> None:
    ctx.obj = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qsweep").setLevel(logging.INFO)


@app.command()
def validate(sweep_file: Path = typer.Argument(..., help="sweep YAML")) -> None:
    """Check a sweep file and everything it names, without training."""
    sweep, _ = load_and_validate(sweep_file)
    console.print(f"[green]{sweep_file}: valid[/] ({sweep.search.num_trials} trials of {sweep.model.name})")


class PreviewFormat(str, Enum):
    text = "text"
    json = "json"


@app.command()
def preview(
    sweep_file: Path = typer.Argument(..., help="sweep YAML"),
    rows: int = typer.Option(3, "--rows", min=1, help="training rows to show"),
    format: PreviewFormat = typer.Option(PreviewFormat.text, "--format", help="text, or json: one row a line"),
) -> None:
    """The first training rows as the model sees them, trained-on tokens marked, and the rows' lengths."""
    import tempfile

    from qsweep.preflight.validate import check_previewable
    from qsweep.report.preview import as_text, build_preview, json_lines, length_summary
    from qsweep.train.chat import ChatRowError

    try:
        sweep = load_sweep(sweep_file)
    except SweepFileError as exc:
        fail(exc.problems, exc.source)
    with tempfile.TemporaryDirectory(prefix="qsweep-preview-") as scratch:
        folder, problems = check_previewable(sweep, Path(scratch))
        if problems:
            fail(problems, str(sweep_file))
        try:
            shown = build_preview(sweep.trial(), sweep.base_dir, folder, rows)
        except ChatRowError as exc:
            fail([f"data.train: {exc}"], str(sweep_file))
    if format is PreviewFormat.json:
        sys.stdout.write(json_lines(shown))
        errors.print(length_summary(shown), markup=False, highlight=False)
        return
    console.print(as_text(shown, colour=console.is_terminal), highlight=False)


def run_with_live_view(sweep: SweepConfig, sweep_file: Path, space: object, address: str | None, verbose: bool):
    """run_sweep with the live view on the terminal and the libraries' own output in the sweep's log."""
    from qsweep.orchestrate.live import sweep_output
    from qsweep.orchestrate.sweep import run_sweep
    from qsweep.tracking.state import SWEEP_LOG, check_folder, output_folder

    # Before the log file is opened in it: a folder another sweep owns is refused untouched.
    check_folder(sweep, str(sweep_file))
    log = output_folder(sweep) / SWEEP_LOG
    if not verbose:
        shown = log.relative_to(Path.cwd()) if log.is_relative_to(Path.cwd()) else log
        console.print(f"Ray's, MLflow's and the libraries' output: {shown}", style="dim", highlight=False)
    with sweep_output(log, verbose):
        return run_sweep(sweep, sweep_file, space, address=address)


def run_or_resume(sweep_file: Path, address: str | None, must_resume: bool, verbose: bool) -> None:
    from qsweep.report.html import REPORT_FILE
    from qsweep.report.leaderboard import build_leaderboard, to_table
    from qsweep.tracking import training_view_url
    from qsweep.tracking.state import output_folder, read_state

    sweep, space = load_and_validate(sweep_file, to_run=True)
    if must_resume and read_state(output_folder(sweep)) is None:
        fail([f"output_dir: nothing to resume in {output_folder(sweep)}; start it with `qsweep run {sweep_file}`"],
             str(sweep_file))
    console.print(f"[bold]{sweep.name}[/]: {sweep.search.num_trials} trials of {sweep.model.name}, "
                  f"ranked by {sweep.search.metric}")
    try:
        summary = run_with_live_view(sweep, sweep_file, space, address or sweep.cluster.address, verbose)
    except SweepFileError as exc:
        fail(exc.problems, exc.source)
    console.print(f"finished {summary.finished}, stopped early {summary.stopped}, failed {summary.failed}")
    if summary.gave_up:
        errors.print(f"[bold red]{summary.gave_up}[/]")
    base = summary.baseline.get(sweep.search.metric)
    if base is not None:
        console.print(f"untuned base model: {sweep.search.metric} = {base:.4f}")
    final_bases = (summary.final or {}).get("baselines", {})
    for name in (f"{task}/acc" for task in (sweep.evaluation.final.tasks if sweep.evaluation.final else [])):
        if shown := ", ".join(f"{scores[name]:.4f} ({quant})" for quant, scores in sorted(final_bases.items())
                              if name in scores):
            console.print(f"untuned base model, final stage: {name} = {shown}")
    if summary.best:
        console.print(f"best trial {summary.best['trial_id']}: {sweep.search.metric} = {summary.best['objective']:.4f}")
    if summary.final:
        verdict = "agrees" if summary.final["agree"] else "disagrees"
        console.print(f"final stage (top {sweep.evaluation.final.top_k} re-scored) {verdict} with the cheap stage "
                      f"on the winner: run {summary.final['final_winner']}")
        console.print(to_table(build_leaderboard(sweep.tracking.uri, sweep.tracking.experiment, top=10)))
    console.print(f"open it: mlflow ui --backend-store-uri {sweep.tracking.uri}, then (training view) "
                  f"{training_view_url(sweep.tracking.uri, summary.experiment_id)}")
    if (report_file := output_folder(sweep) / REPORT_FILE).exists():
        console.print(f"report: {report_file}")
    if not summary.finished:
        raise typer.Exit(code=1)


@app.command()
def run(
    ctx: typer.Context,
    sweep_file: Path = typer.Argument(..., help="sweep YAML, e.g. sweeps/quickstart.yaml"),
    address: Optional[str] = typer.Option(None, help="Ray cluster: auto or HEAD:6379 (ray://HOST:PORT needs ray[client])"),
) -> None:
    """Validate, then run the sweep (or resume it if it was interrupted) and print its leaderboard."""
    run_or_resume(sweep_file, address, must_resume=False, verbose=bool(ctx.obj))


@app.command()
def resume(
    ctx: typer.Context,
    sweep_file: Path = typer.Argument(..., help="the sweep YAML that was interrupted"),
    address: Optional[str] = typer.Option(None, help="Ray cluster: auto or HEAD:6379 (ray://HOST:PORT needs ray[client])"),
) -> None:
    """Continue an interrupted sweep: finished trials are kept, interrupted ones retried."""
    run_or_resume(sweep_file, address, must_resume=True, verbose=bool(ctx.obj))


@app.command()
def status(
    target: Optional[Path] = typer.Argument(None, help="sweep YAML or its output folder (default: the latest in ./runs)"),
    format: Format = typer.Option(Format.table, "--format", help="table or json"),
) -> None:
    """Where a sweep stands (running, finished, killed or crashed), from its output folder and MLflow alone."""
    import json

    from qsweep.orchestrate.status import NoSweep, find_folder, progress_from_mlflow
    from qsweep.report.progress import SWEEP_INTERRUPTED, as_dict, progress_table

    try:
        progress = progress_from_mlflow(find_folder(target))
    except NoSweep as exc:
        fail([str(exc)])
    if format is Format.json:
        sys.stdout.write(json.dumps(as_dict(progress), indent=2) + "\n")
        return
    console.print(progress_table(progress))
    if progress.state == SWEEP_INTERRUPTED:
        console.print("its driver is gone (killed or crashed); `qsweep resume SWEEP.yaml` goes on from here")


@app.command()
def leaderboard(
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment (default: the latest sweep's)"),
    metric: Optional[str] = typer.Option(None, help="TASK/METRIC to rank by (default: the sweep's metric)"),
    top: int = typer.Option(10, min=1, help="rows to show"),
    where: list[str] = typer.Option([], "--where", help="param filter, e.g. quant=nf4 or lora.r!=8 (repeatable)"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="only this sweep's trials"),
    pareto: bool = typer.Option(False, "--pareto", help="only the score / peak-memory / train-time front"),
    format: Format = typer.Option(Format.table, "--format", help="table, json, csv or markdown"),
    tracking_uri: str = typer.Option(
        default_tracking_uri(), "--tracking-uri", help="MLflow tracking URI"
    ),
) -> None:
    """Best finished trials first, with their key params and scores."""
    from qsweep.report.leaderboard import LeaderboardError, build_leaderboard, to_csv, to_json, to_markdown, to_table

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        fail([f"--tracking-uri: {tracking_uri} does not exist here; run a sweep first or pass --tracking-uri"])
    try:
        board = build_leaderboard(tracking_uri, experiment, metric, top, where=where, sweep=sweep)
    except LeaderboardError as exc:
        fail([str(exc)])
    if pareto:
        board.rows = [row for row in board.rows if row["pareto"]]
    if format is Format.table:
        console.print(to_table(board))
    else:
        writers = {Format.json: lambda b: to_json(b) + "\n", Format.csv: to_csv, Format.markdown: to_markdown}
        sys.stdout.write(writers[format](board))


@app.command()
def reproduce(
    run_id: str = typer.Argument(..., help="a finished trial's MLflow run id (see `qsweep leaderboard`)"),
    tracking_uri: str = typer.Option(
        default_tracking_uri(), "--tracking-uri", help="MLflow tracking URI"
    ),
) -> None:
    """Reload a trial's adapter onto its logged base and quantization, re-score it, compare."""
    from rich.table import Table

    from qsweep.evaluate.harness import score
    from qsweep.report.replay import ProvenanceError, fetch_logged_trial, load_trained

    try:
        logged = fetch_logged_trial(tracking_uri, run_id)
        base_dir = Path(logged.provenance.get("base_dir", "."))
        model, tokenizer = load_trained(logged.trial, logged.adapter_dir, base_dir)
    except ProvenanceError as exc:
        fail([str(exc)])
    scores = score(model, tokenizer, logged.trial.evaluation, base_dir, logged.trial.quantization).scores
    table = Table(title=f"run {run_id}: logged vs reproduced")
    for column in ("metric", "logged", "reproduced"):
        table.add_column(column)
    for name, value in sorted(scores.items()):
        logged_value = logged.metrics.get(name)
        table.add_row(name, "-" if logged_value is None else f"{logged_value:.4f}", f"{value:.4f}")
    console.print(table)


TRACKING_OPTION = typer.Option(
    default_tracking_uri(), "--tracking-uri", help="MLflow tracking URI"
)


def _fetch(tracking_uri: str, run_id: str, with_adapter: bool = True):
    from qsweep.report.replay import ProvenanceError, fetch_logged_trial

    try:
        return fetch_logged_trial(tracking_uri, run_id, with_adapter=with_adapter)
    except ProvenanceError as exc:
        fail([str(exc)])


@app.command()
def show(run_id: str = typer.Argument(..., help="a finished trial's MLflow run id"),
         tracking_uri: str = TRACKING_OPTION) -> None:
    """Print a trial's full config and scores as a single-trial sweep file (`qsweep run` re-trains it)."""
    from qsweep.report.publish import single_trial_sweep

    logged = _fetch(tracking_uri, run_id, with_adapter=False)
    sys.stdout.write(single_trial_sweep(logged, tracking_uri))


@app.command()
def promote(run_id: str = typer.Argument(..., help="a finished trial's MLflow run id"),
            alias: str = typer.Option("production", help="registry alias to point at this version"),
            tracking_uri: str = TRACKING_OPTION) -> None:
    """Register the trial's adapter in the MLflow Model Registry and set the alias."""
    from qsweep.report.publish import PublishError
    from qsweep.report.publish import promote as register

    logged = _fetch(tracking_uri, run_id)
    try:
        name, version = register(tracking_uri, logged, alias)
    except PublishError as exc:
        fail([str(exc)])
    console.print(f"registered [bold]{name}[/] version {version}, alias {alias}: models:/{name}@{alias}")


@app.command()
def export(run_id: str = typer.Argument(..., help="a finished trial's MLflow run id"),
           dest: Path = typer.Argument(..., help="an empty or new folder"),
           tracking_uri: str = TRACKING_OPTION) -> None:
    """Write base/ + adapter/ + README card: loads with PeftModel and with lm-eval's peft= as-is."""
    from qsweep.report.publish import PublishError
    from qsweep.report.publish import export as write_export
    from qsweep.train.chat import read_template
    from qsweep.train.models import resolve_model
    from qsweep.train.provenance import ProvenanceError, check_base
    from qsweep.train.trial import load_base

    logged = _fetch(tracking_uri, run_id)
    base_dir = Path(logged.provenance.get("base_dir", "."))
    model_info = resolve_model(logged.trial.model.name, logged.trial.model.revision, base_dir)
    try:
        check_base(model_info.content_hash, logged.provenance)
        model, tokenizer = load_base(model_info.path, logged.trial.quantization, logged.trial.model.trust_remote_code,
                                     savable=True, chat_template=read_template(logged.trial.data.chat_template, base_dir))
        write_export(logged, model, tokenizer, dest)
    except (PublishError, ProvenanceError) as exc:
        fail([str(exc)])
    console.print(f"exported to {dest}: base/ (4-bit), adapter/, tasks/, README.md")


@app.command()
def ablate(
    ctx: typer.Context,
    ablation_file: Path = typer.Argument(..., help="ablation YAML, e.g. sweeps/ablation-quant.yaml"),
    address: Optional[str] = typer.Option(None, help="Ray cluster: auto or HEAD:6379 (ray://HOST:PORT needs ray[client])"),
) -> None:
    """Run every factor value x seed through the orchestrator, then report mean ± 95% CI and paired tests."""
    from qsweep.orchestrate.ablation_grid import as_sweep, load_ablation, report
    from qsweep.preflight.validate import validate_sweep
    from qsweep.report.ablation_report import to_markdown
    from qsweep.report.html import publish_at_end
    from qsweep.tracking.state import output_folder

    try:
        ablation = load_ablation(ablation_file)
        sweep, space = as_sweep(ablation)
        validate_sweep(sweep, str(ablation_file), space)
        console.print(f"[bold]{sweep.name}[/]: {sweep.search.num_trials} trials "
                      f"({len(ablation.ablation.seeds)} seeds per cell), ranked by {sweep.search.metric}")
        summary = run_with_live_view(sweep, ablation_file, space, address or sweep.cluster.address, bool(ctx.obj))
    except SweepFileError as exc:
        fail(exc.problems, exc.source)
    console.print(f"finished {summary.finished}, failed {summary.failed}")
    if not summary.finished:
        raise typer.Exit(code=1)
    result = report(sweep, ablation.ablation, summary.experiment_id, summary.parent_run_id,
                    output_folder(sweep) / "report")
    publish_at_end(sweep.tracking.uri, summary.parent_run_id, output_folder(sweep))
    console.print(to_markdown(result), markup=False, highlight=False)
    console.print(f"report and plot: {output_folder(sweep) / 'report'} (also on MLflow run {summary.parent_run_id})")


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


@app.command()
def estimate(
    sweep_file: Path = typer.Argument(..., help="sweep YAML"),
    device: Device = typer.Option(Device.auto, help="estimate for this device (auto = this machine's)"),
    format: Format = typer.Option(Format.table, "--format", help="table or json"),
) -> None:
    """Peak memory of one trial, by component, for the baseline and the extremes of the search space."""
    import json

    from rich.table import Table

    from qsweep.resources.packing import (
        Card,
        Machine,
        budget_mb,
        cuda_machine,
        extreme_trials,
        resource_request,
        sized_estimate,
        this_machine,
    )
    from qsweep.train.models import resolve_model

    sweep, space = load_and_validate(sweep_file)
    machine = this_machine()
    if device is not Device.auto and device.value != machine.device:
        machine = cuda_machine(Card(80 * 1024)) if device is Device.cuda else Machine("cpu", machine.memory_mb)
    path = resolve_model(sweep.model.name, sweep.model.revision, sweep.base_dir).path
    estimates = {name: sized_estimate(trial, sweep.base_dir, path, machine.device, machine.context_mb)
                 for name, trial in extreme_trials(sweep, space).items()}
    rows = {name: {**e.model_dump(), "sizing": e.sequence.describe(), "budget_mb": budget_mb(e),
                   "request": resource_request(e, machine, sweep.resources.cpus_per_trial)}
            for name, e in estimates.items()}
    if format is Format.json:
        sys.stdout.write(json.dumps({"device": machine.device, "memory_mb": machine.memory_mb, "trials": rows},
                                    indent=2) + "\n")
        return
    table = Table(title=f"{sweep.name}: peak memory of one trial on {machine.device} (MiB)")
    table.add_column("component")
    for name in rows:
        table.add_column(name, justify="right")
    fields = ["quantized_weights", "unquantized_weights", "lora_params", "lora_grads", "optimizer_state",
              "activations", "runtime_overhead", "heap_slack", "total", "budget_mb"]
    for field in fields:
        table.add_row(field, *(f"{rows[name][field]:,.1f}" for name in rows))
    per_card = {name: int(machine.memory_mb // (r["budget_mb"] + (estimates[name].runtime_overhead
                                                                  if machine.device == "cuda" else 0)))
                for name, r in rows.items()}
    table.add_row("trials that fit", *(str(per_card[name]) for name in rows))
    console.print(table)
    for name, e in estimates.items():
        console.print(f"{name}: {e.sequence.describe()}", markup=False, highlight=False)


@app.command()
def calibrate(
    experiment: Optional[str] = typer.Option(None, help="only this experiment's trials (default: all)"),
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Fit the estimator's correction from measured peaks in MLflow, and learn each card's CUDA context."""
    from qsweep.resources.packing import fit_calibration, measured_peak, save_calibration, save_cuda_contexts
    from qsweep.tracking import client

    mlflow_client = client(tracking_uri)
    experiments = [mlflow_client.get_experiment_by_name(experiment)] if experiment else mlflow_client.search_experiments()
    if not experiments or experiments[0] is None:
        fail([f"--experiment {experiment!r} does not exist in {tracking_uri}"])
    runs = mlflow_client.search_runs([e.experiment_id for e in experiments],
                                     filter_string="tags.`qsweep.outcome` = 'finished'", max_results=10000)
    by_device: dict[str, list[tuple[float, float]]] = {}
    contexts: dict[str, list[float]] = {}
    for run in runs:
        metrics, card = run.data.metrics, run.data.params.get("provenance.device", "cpu")
        device = "cpu" if card == "cpu" else "cuda"
        if "memory_estimate_mb" in metrics and (peak := measured_peak(metrics, device)) is not None:
            by_device.setdefault(device, []).append((metrics["memory_estimate_mb"], peak))
        if device == "cuda" and "cuda_context_mb" in metrics:
            contexts.setdefault(card, []).append(metrics["cuda_context_mb"])
    if not by_device:
        fail(["no finished trial with both memory_estimate_mb and its measured peak (peak_memory_mb; on CUDA "
              "peak_reserved_mb); run a sweep first"])
    for device, pairs in by_device.items():
        fitted = fit_calibration(pairs)
        path = save_calibration(device, fitted.factor, len(pairs))
        console.print(f"{device}: {len(pairs)} trials, {fitted.reason}: factor {fitted.factor:.3f} saved to {path}")
    if path := save_cuda_contexts(contexts):
        for card, values in contexts.items():
            console.print(f"{card}: CUDA context up to {max(values):,.0f} MiB in {len(values)} trials, saved to {path}")


@app.command()
def report(
    target: Optional[str] = typer.Argument(
        None, help="sweep YAML, or an MLflow run id (the sweep's or one of its trials'); default: the latest sweep"),
    experiment: Optional[str] = typer.Option(None, help="the latest sweep of this MLflow experiment"),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: OUTPUT_DIR/NAME/report.html)"),
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Write the sweep's report, one HTML file: leaderboard, Pareto plot, params, importances, loss curves."""
    from qsweep.report.html import REPORT_FILE, load_record, write_report
    from qsweep.report.locate import LocateError, locate

    try:
        where = locate(target, experiment, tracking_uri)
    except SweepFileError as exc:
        fail(exc.problems, exc.source)
    except LocateError as exc:
        fail([str(exc)])
    record = load_record(where.uri, where.parent_run_id, where.folder)
    path = out or (where.folder / REPORT_FILE if where.folder else Path(f"{record.name}-{REPORT_FILE}"))
    console.print(f"report: {write_report(record, path)}")


@app.command()
def dashboard(
    sweep_file: Path = typer.Argument(..., help="sweep YAML whose Optuna study to open"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8080, help="port to listen on"),
) -> None:
    """Open the sweep's Optuna study in optuna-dashboard (the same as `optuna-dashboard sqlite:///runs/NAME/optuna.db`)."""
    from optuna_dashboard import run_server

    from qsweep.tracking.state import output_folder

    try:
        study_file = output_folder(load_sweep(sweep_file)) / "optuna.db"
    except SweepFileError as exc:
        fail(exc.problems, exc.source)
    if not study_file.exists():
        fail([f"{study_file} does not exist; run the sweep first with `qsweep run {sweep_file}`"], str(sweep_file))
    console.print(f"optuna-dashboard on http://{host}:{port}/ (Ctrl-C stops it)")
    run_server(f"sqlite:///{study_file}", host=host, port=port)
