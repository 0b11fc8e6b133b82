"""What a person opens after a sweep, opened for real over one finished tiny sweep: the HTML report
and MLflow's UI in headless Chromium, and optuna-dashboard over the sweep's study."""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from browser import Chromium
from typer.testing import CliRunner

from qsweep import tracking
from qsweep.cli import app
from qsweep.report.html import REPORT_FILE

pytestmark = pytest.mark.slow

NAME = "views"
SERVER_START_S = 180


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_sweep_base) -> dict:
    """4 trials one at a time; ASHA lets the first two through its rung at step 5 and stops the
    third, whose learning rate is 30 times smaller, if it is behind them there."""
    workdir = tmp_path_factory.mktemp("views")
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["name"] = NAME
    sweep["tracking"] = {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": NAME}
    sweep["output_dir"] = str(workdir / "runs")
    sweep["search"].update({
        "num_trials": 4, "max_concurrent": 1,
        "asha": {"grace_steps": 5, "reduction_factor": 2, "min_trials_per_rung": 2},
        "baselines": [
            {"quantization.quant_type": "nf4", "lora.r": 8, "lora.target_modules": "all-linear",
             "training.learning_rate": 3e-3},
            {"quantization.quant_type": "fp4", "lora.r": 8, "lora.target_modules": "all-linear",
             "training.learning_rate": 3e-3},
            {"quantization.quant_type": "nf4", "lora.r": 4, "lora.target_modules": "attention",
             "training.learning_rate": 1e-4},
        ],
    })
    path = workdir / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = CliRunner().invoke(app, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    mlflow_client = tracking.client(sweep["tracking"]["uri"])
    experiment = mlflow_client.get_experiment_by_name(NAME)
    runs = mlflow_client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return {"uri": sweep["tracking"]["uri"], "folder": workdir / "runs" / NAME, "experiment": experiment,
            "parent": next(r for r in runs if r.data.tags["qsweep.kind"] == "sweep"),
            "trials": [r for r in runs if r.data.tags["qsweep.kind"] == "trial"], "workdir": workdir,
            "sweep_file": path, "output": result.output}


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(tmp_path / "profile")
    yield chromium
    chromium.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(command: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    """Starts a server and waits until `ready_url` answers 200."""
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(1)
    process.kill()
    raise TimeoutError(f"{command[0]} did not answer {ready_url}: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def as_javascript(value: float) -> str:
    """A number as the page prints it: JavaScript writes 0.0 as `0`, otherwise as Python does."""
    return str(int(value)) if value.is_integer() else repr(value)


def _history(uri: str, run_id: str) -> list:
    return tracking.client(uri).get_metric_history(run_id, "eval_loss")


def test_the_sweep_names_describes_and_reports_itself(finished):
    parent, trials = finished["parent"], finished["trials"]
    assert finished["experiment"].tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert "workflowType=machine_learning" in finished["output"]
    numbers = []
    for run in trials:
        params = run.data.params
        match = re.fullmatch(rf"{NAME} #(\d+) (nf4|fp4) r(\d+) lr([0-9.]+e-?\d+) (\S+)", run.info.run_name)
        assert match, run.info.run_name
        numbers.append(int(match[1]))
        assert (match[2], match[3], match[5]) == (params["quantization.quant_type"], params["lora.r"],
                                                 params["lora.target_modules"])
        assert float(match[4]) == pytest.approx(float(params["training.learning_rate"]), rel=0.05)
        description = run.data.tags[tracking.DESCRIPTION_TAG]
        assert f"LoRA r {params['lora.r']}" in description and run.data.tags["qsweep.trial_id"] in description
    assert sorted(numbers) == [1, 2, 3, 4]
    outcomes = [run.data.tags["qsweep.outcome"] for run in trials]
    assert outcomes.count("finished") >= 2 and outcomes[2] == "stopped", outcomes
    # The report went to the output folder and onto the parent run; its leaderboard to the description.
    assert (finished["folder"] / REPORT_FILE).stat().st_size > 1_000_000
    mlflow_client = tracking.client(finished["uri"])
    assert REPORT_FILE in {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    description = parent.data.tags[tracking.DESCRIPTION_TAG]
    for run, outcome in zip(trials, outcomes):
        assert (run.info.run_id in description) == (outcome == "finished")


def test_report_renders_every_plot_in_chromium(finished, browser):
    report = finished["folder"] / REPORT_FILE
    graphs = report.read_text().count('class="plotly-graph-div"')
    assert graphs >= 4  # Pareto, parallel coordinates, importances, loss curves
    page = browser.open(report.as_uri())
    page.wait_for(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {graphs}")
    rendered = page.evaluate("""[...document.querySelectorAll('.js-plotly-plot')].map(d => ({
        traces: d.data.length,
        points: d.querySelectorAll('.scatterlayer .trace .points path').length,
        legend: [...d.querySelectorAll('.legendtext')].map(t => t.textContent)}))""")
    assert len(rendered) == graphs and all(plot["traces"] > 0 for plot in rendered)
    curves = next(plot for plot in rendered if "stopped by ASHA" in plot["legend"])
    trials = finished["trials"]
    assert set(curves["legend"]) == {run.info.run_name for run in trials} | {"stopped by ASHA"}
    stopped = [run for run in trials if run.data.tags["qsweep.outcome"] == "stopped"]
    logged_points = sum(len({m.step for m in _history(finished["uri"], run.info.run_id)}) for run in trials)
    assert curves["points"] == logged_points + len(stopped)
    assert page.problems() == []


def test_mlflow_ui_training_view_shows_the_sweep(finished, browser, tmp_path):
    port = free_port()
    server = serve([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", finished["uri"],
                    "--host", "127.0.0.1", "--port", str(port)],
                   f"http://127.0.0.1:{port}/health", tmp_path / "mlflow.log")
    try:
        experiment_id = finished["experiment"].experiment_id
        page = browser.open(tracking.training_view_url(f"http://127.0.0.1:{port}", experiment_id), width=1600)
        parent, trials = finished["parent"], finished["trials"]
        page.wait_for(f"[...document.querySelectorAll('.ag-row a')].some(a => a.textContent === {parent.info.run_name!r})")
        sidebar = page.evaluate("document.querySelector('aside').innerText")
        assert "Runs" in sidebar and "Evaluation runs" not in sidebar, sidebar
        assert "workflowType=machine_learning" in page.evaluate("location.hash")
        # Child runs are nested under the sweep's run: expand it, as a person would.
        page.evaluate("document.querySelector('.ag-row button').click()")
        names = {run.info.run_name for run in trials}
        shown = page.wait_for(f"""(() => {{ const names = [...document.querySelectorAll('.ag-row a')]
            .map(a => a.textContent); return {json.dumps(sorted(names))}.every(n => names.includes(n)) && names; }})()""")
        assert parent.info.run_name in shown
        for run in [parent, *trials]:
            page.evaluate(f"location.hash = '#/experiments/{experiment_id}/runs/{run.info.run_id}"
                          "?workflowType=machine_learning'")
            text = page.wait_for(f"""document.body.innerText.includes({run.info.run_name!r})
                && document.body.innerText.includes('Parameters (') && document.body.innerText""")
            for key in ("quantization.quant_type", "lora.r", "training.learning_rate"):
                assert f"{key}\n{run.data.params[key]}" in text, key
            logged = [m for m in ("eval_loss", "zorble/acc") if m in run.data.metrics]
            assert logged or run is parent, run.info.run_name
            for metric in logged:
                assert f"{metric}\n{as_javascript(run.data.metrics[metric])}" in text, metric
            description = run.data.tags[tracking.DESCRIPTION_TAG]
            assert description.splitlines()[0].replace("**", "") in text
    finally:
        stop(server)


@pytest.mark.parametrize("command", ["optuna-dashboard", "qsweep dashboard"])
def test_optuna_dashboard_opens_the_study(finished, tmp_path, command):
    import optuna

    port = free_port()
    study_db = finished["folder"] / "optuna.db"
    name = finished["parent"].data.tags["qsweep.sweep"]
    if command == "optuna-dashboard":
        argv = [str(Path(sys.executable).parent / "optuna-dashboard"), f"sqlite:///{study_db}"]
    else:
        argv = [sys.executable, "-c", "from qsweep.cli import app; app()", "dashboard", str(finished["sweep_file"])]
    server = serve([*argv, "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/api/studies",
                   tmp_path / "dashboard.log")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as response:
            summaries = json.load(response)["study_summaries"]
        assert [s["study_name"] for s in summaries] == [name]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}") as response:
            served = json.load(response)["trials"]
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_db}")
        assert len(served) == len(study.trials) == len(finished["trials"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard") as response:
            assert response.status == 200
    finally:
        stop(server)
