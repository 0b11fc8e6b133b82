"""The sweep report, run names and the experiment kind, on a real MLflow store and Optuna study
written the way a sweep writes them (no Ray, so these stay fast)."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from qsweep import tracking
from qsweep.cli import app
from qsweep.config.schema import SweepConfig, dump_yaml
from qsweep.report import html
from qsweep.report import html_figures as figures
from qsweep.report.leaderboard import build_leaderboard, to_markdown
from qsweep.tracking import naming
from qsweep.tracking.state import SweepState, fingerprint, output_folder, write_state

METRIC = "zorble/acc"
# (quant, r, lr, outcome, eval_loss by step, score, peak MiB, train s)
TRIALS = [
    ("nf4", 8, 3e-3, "finished", {5: 4.0, 10: 3.5}, 0.50, 30.0, 4.0),
    ("fp4", 16, 1e-3, "finished", {5: 4.2, 10: 3.9}, 0.25, 25.0, 3.0),
    ("nf4", 4, 1e-4, "stopped", {5: 5.0}, None, None, None),
    ("fp4", 32, 2e-4, "finished", {5: 4.1, 10: 3.7}, 0.375, 40.0, 6.0),
]
BASELINES = {"nf4": 0.125, "fp4": 0.0}


def _sweep(tmp_path: Path, tiny_sweep_dict: dict) -> SweepConfig:
    tiny_sweep_dict["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny"}
    tiny_sweep_dict["output_dir"] = str(tmp_path / "runs")
    tiny_sweep_dict["search"]["asha"] = {"grace_steps": 5, "reduction_factor": 2}
    return SweepConfig(**tiny_sweep_dict)


def _study(folder: Path, name: str) -> None:
    """The Optuna study as Ray's OptunaSearch leaves it: finished trials COMPLETE, stopped PRUNED."""
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}", direction="maximize")
    distributions = {"quantization.quant_type": optuna.distributions.CategoricalDistribution(["nf4", "fp4"]),
                     "lora.r": optuna.distributions.CategoricalDistribution([4, 8, 16, 32]),
                     "training.learning_rate": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)}
    for quant, r, lr, outcome, _, score, _, _ in TRIALS:
        state = optuna.trial.TrialState.COMPLETE if outcome == "finished" else optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(
            params={"quantization.quant_type": quant, "lora.r": r, "training.learning_rate": lr},
            distributions=distributions, value=score, state=state))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sweep_base) -> dict:
    """A finished 4-trial sweep's records: parent run, child runs with curves, study, state file."""
    import copy

    tmp_path = tmp_path_factory.mktemp("report")
    sweep = _sweep(tmp_path, copy.deepcopy(tiny_sweep_base))
    uri = sweep.tracking.uri
    mlflow_client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(uri, "tiny")
    parent = tracking.start_run(mlflow_client, experiment_id, "tiny", {
        "qsweep.kind": "sweep", "qsweep.sweep": "tiny", "qsweep.metric": METRIC, "qsweep.direction": "maximize"})
    tracking.log_batch(mlflow_client, parent, params=tracking.flatten(sweep.model_dump(mode="json")), metrics={
        **{f"baseline/{q}/{METRIC}": v for q, v in BASELINES.items()}, f"baseline/{METRIC}": BASELINES["nf4"]})
    runs = []
    for number, (quant, r, lr, outcome, losses, score, peak, seconds) in enumerate(TRIALS, start=1):
        trial = sweep.trial().model_dump(mode="json")
        trial["quantization"]["quant_type"], trial["lora"]["r"], trial["training"]["learning_rate"] = quant, r, lr
        run = tracking.start_run(mlflow_client, experiment_id, naming.trial_run_name("tiny", number, trial), {
            "mlflow.parentRunId": parent, "qsweep.kind": "trial", "qsweep.sweep": "tiny",
            "qsweep.trial_id": f"t{number}", "qsweep.outcome": outcome})
        tracking.log_batch(mlflow_client, run, params=tracking.flatten(trial))
        for step, loss in losses.items():
            tracking.log_batch(mlflow_client, run, metrics={"eval_loss": loss}, step=step)
        if score is not None:
            tracking.log_batch(mlflow_client, run, metrics={METRIC: score, f"{METRIC}_stderr": 0.1,
                                                            "peak_memory_mb": peak, "train_seconds": seconds})
        tracking.end_run(mlflow_client, run, "FINISHED" if outcome == "finished" else "KILLED")
        runs.append(run)
    tracking.end_run(mlflow_client, parent, "FINISHED")
    folder = output_folder(sweep)
    write_state(folder, SweepState(fingerprint(sweep), experiment_id, parent, uri))
    _study(folder, "tiny")
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(dump_yaml(sweep.model_dump(mode="json")))
    return {"uri": uri, "parent": parent, "runs": runs, "folder": folder, "sweep_file": sweep_file,
            "experiment_id": experiment_id, "tmp": tmp_path}


def _record(store: dict) -> html.SweepRecord:
    return html.load_record(store["uri"], store["parent"], store["folder"])


def test_report_has_every_section_and_inlines_plotly_once(store):
    page = html.render(_record(store))
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles == ["Leaderboard", "Pareto: score against peak memory and train time", "Parameters against score",
                      "Parameter importances", "Validation loss"]
    # Self-contained: plotly.js inlined once, nothing loaded from elsewhere.
    assert page.count("plotly.js v") == 1
    assert not re.search(r"<script[^>]+src=", page)
    finished = [run for run, t in zip(store["runs"], TRIALS) if t[3] == "finished"]
    stopped = [run for run, t in zip(store["runs"], TRIALS) if t[3] == "stopped"]
    board = page.split("<h2>Leaderboard</h2>")[1].split("<h2>")[0]
    assert all(run in board for run in finished) and not any(run in board for run in stopped)


def test_without_the_study_the_report_says_where_it_lives(store):
    page = html.render(html.load_record(store["uri"], store["parent"], None))
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles == ["Leaderboard", "Pareto: score against peak memory and train time", "Validation loss",
                      "Parameters"]
    assert "optuna.db) is not on this machine" in page


def test_report_figures_carry_the_logged_numbers(store):
    record = _record(store)
    board = html.leaderboard(record)
    pareto = figures.pareto_figure(board.rows, METRIC, html.baselines(record, METRIC), ["quant"])
    plotted = sorted(y for trace in pareto.data if trace.xaxis == "x" for y in trace.y)
    assert plotted == sorted(t[5] for t in TRIALS if t[5] is not None)
    # One dashed line per 4-bit type on each of the two panels.
    assert sorted(shape.y0 for shape in pareto.layout.shapes) == sorted([*BASELINES.values()] * 2)
    front = next(trace for trace in pareto.data if trace.name == "Pareto front" and trace.xaxis == "x")
    # By hand: 0.5 scores best, 0.25 costs least memory and time, and 0.375 costs more and scores
    # less than 0.5.
    assert sorted(front.y) == [0.25, 0.5]
    curves = html.curves(record)
    assert [(c.steps, c.losses) for c in curves] == [(list(t[4]), list(t[4].values())) for t in TRIALS]
    marks = figures.curves_figure(curves)
    stops = next(trace for trace in marks.data if trace.name == "stopped by ASHA")
    assert (list(stops.x), list(stops.y)) == ([5], [5.0])


def test_asha_rungs_are_rays_milestones():
    from ray.tune.schedulers import ASHAScheduler

    for grace, factor, max_steps in ((5, 2, 10), (10, 2, 100), (20, 3, 200), (10, 2.5, 40)):
        scheduler = ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=max_steps,
                                  grace_period=grace, reduction_factor=factor)
        milestones = {int(m) for m, _ in scheduler._brackets[0]._rungs} - {max_steps}
        params = {"search.asha.enabled": "True", "search.asha.grace_steps": str(grace),
                  "search.asha.reduction_factor": str(factor), "training.max_steps": str(max_steps)}
        assert html.asha_rungs(params) == sorted(milestones)
    assert html.asha_rungs({"search.asha.enabled": "False"}) == []


def test_a_multi_objective_study_gets_parallel_coordinates_and_a_note(store, tmp_path):
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                directions=["maximize", "minimize"])
    for x in (0.1, 0.5, 0.9):
        study.enqueue_trial({"x": x})
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1 - t.params["x"]), n_trials=1)
    record = html.load_record(store["uri"], store["parent"], tmp_path)
    figs, notes = html.optuna_figures(record, METRIC)
    assert [title for title, _ in figs] == ["Parameters against score"]
    # Optuna draws one line per trial, its first point on the target axis: the first objective.
    lines = [trace for trace in figs[0][1].data if trace.customdata is not None]
    assert sorted(float(line.customdata[0][1]) for line in lines) == [0.1, 0.5, 0.9]
    assert {line.customdata[0][0] for line in lines} == {METRIC}
    assert "several objectives" in notes[0].body


def test_publish_writes_logs_and_describes_the_parent(store):
    path = html.publish(store["uri"], store["parent"], store["folder"])
    assert path == store["folder"] / html.REPORT_FILE and path.stat().st_size > 1_000_000
    mlflow_client = tracking.client(store["uri"])
    assert html.REPORT_FILE in {a.path for a in mlflow_client.list_artifacts(store["parent"])}
    description = mlflow_client.get_run(store["parent"]).data.tags[tracking.DESCRIPTION_TAG]
    assert description.startswith(to_markdown(build_leaderboard(store["uri"], "tiny", top=html.ALL_ROWS)))


def test_ablation_tables_appear_when_logged(store, tmp_path):
    markdown = "# Ablation: zorble/acc\n\n| cell | seeds | mean |\n|---|---:|---:|\n| quant=nf4 | 2 | 0.5000 |\n"
    (tmp_path / "ablation_report.md").write_text(markdown)
    mlflow_client = tracking.client(store["uri"])
    mlflow_client.log_artifact(store["parent"], str(tmp_path / "ablation_report.md"), artifact_path="ablation")
    page = html.render(_record(store))
    section = page.split("<h2>Ablation</h2>")[1]
    assert "<td>quant=nf4</td>" in section and '<td style="text-align:right">0.5000</td>' in section


def test_report_command_finds_the_sweep_by_file_trial_run_and_experiment(store, monkeypatch):
    monkeypatch.chdir(store["tmp"])
    runner = CliRunner()
    written = store["folder"] / html.REPORT_FILE
    written.unlink(missing_ok=True)  # an earlier test may have published it: this one must write its own
    by_file = runner.invoke(app, ["report", str(store["sweep_file"])])
    assert by_file.exit_code == 0, by_file.output
    assert store["parent"] in written.read_text()
    out = store["tmp"] / "from-trial.html"
    by_run = runner.invoke(app, ["report", store["runs"][0], "--tracking-uri", store["uri"], "--out", str(out)])
    assert by_run.exit_code == 0, by_run.output
    assert store["parent"] in out.read_text()
    by_experiment = runner.invoke(app, ["report", "--experiment", "tiny", "--tracking-uri", store["uri"],
                                        "--out", str(store["tmp"] / "e.html")])
    assert by_experiment.exit_code == 0 and "Parameters against score" in (store["tmp"] / "e.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["report", "nowhere.yaml"], "no such sweep file"),
    (["report", "0123456789abcdef0123456789abcdef"], "is not in"),
    (["report", "--experiment", "nope"], "holds no qsweep sweep"),
])
def test_report_command_errors_exit_2(store, monkeypatch, args, message):
    monkeypatch.chdir(store["tmp"])
    result = CliRunner().invoke(app, [*args, "--tracking-uri", store["uri"]])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_report_command_on_a_sweep_that_never_ran(tmp_path, tiny_sweep_dict, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(dump_yaml(_sweep(tmp_path, tiny_sweep_dict).model_dump(mode="json")))
    result = CliRunner().invoke(app, ["report", "s.yaml"])
    assert result.exit_code == 2 and "run it first" in result.output


def test_dashboard_of_a_sweep_that_never_ran(tmp_path, tiny_sweep_dict, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(dump_yaml(_sweep(tmp_path, tiny_sweep_dict).model_dump(mode="json")))
    result = CliRunner().invoke(app, ["dashboard", "s.yaml"])
    assert result.exit_code == 2 and "optuna.db does not exist" in result.output


def test_experiments_are_marked_as_training_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_client = tracking.client(uri)
    fresh = tracking.ensure_experiment(uri, "fresh")
    untagged = mlflow_client.create_experiment("old")
    chosen = mlflow_client.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.ensure_experiment(uri, "old") == untagged
    assert tracking.ensure_experiment(uri, "chosen") == chosen
    kinds = {e: mlflow_client.get_experiment(e).tags.get(tracking.EXPERIMENT_KIND_TAG) for e in (fresh, untagged, chosen)}
    assert kinds == {fresh: "custom_model_development", untagged: "custom_model_development",
                     chosen: "genai_development"}
    assert tracking.training_view_url(uri, fresh).endswith(f"/#/experiments/{fresh}/runs?workflowType=machine_learning")
    assert tracking.training_view_url("https://mlflow.example:8443", "7").startswith("https://mlflow.example:8443/#/")


def test_run_names_and_summaries(tiny_sweep_dict):
    trial = SweepConfig(**tiny_sweep_dict).trial().model_dump(mode="json")
    trial["training"]["learning_rate"] = 3e-4
    trial["lora"]["target_modules"] = ["q_proj", "v_proj"]
    assert naming.trial_run_name("quickstart", 3, trial) == "quickstart #3 nf4 r16 lr3e-4 q_proj,v_proj"
    summary = naming.trial_summary(trial)
    assert "\n" not in summary
    for part in ("tiny-llama", "nf4 + double quant", "r 16", "alpha 32", "lr 3e-4 cosine", "10 steps", "batch 4"):
        assert part in summary, part
    assert [naming.short_float(v) for v in (1e-3, 2.5e-4, 0.00031, 1.0)] == ["1e-3", "2.5e-4", "3.1e-4", "1e0"]
    assert naming.trial_number("12_lora.r=8,quant=nf4") == 12 and naming.trial_number("") is None
