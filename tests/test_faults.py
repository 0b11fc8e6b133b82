"""Fault injection with the real stack: each kind of trial failure ends that trial only, is recorded
in MLflow with its reason, is told to Optuna, and the sweep goes on."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from sweep_bench import SweepBench
from typer.testing import CliRunner

from qsweep.cli import app

pytestmark = pytest.mark.slow

FAULT_SPACE = {
    "params": {
        "training.learning_rate": {"choices": [1.0e-3, 1.0e30]},
        "limits.time_budget_s": {"choices": [None, 0.01]},
        "limits.memory_mb": {"choices": [None, 1]},
        "model.name": {"choices": ["tiny-llama", "BROKEN"]},
    }
}


def _point(**overrides) -> dict:
    point = {"training.learning_rate": 1.0e-3, "limits.time_budget_s": None, "limits.memory_mb": None,
             "model.name": "tiny-llama"}
    point.update({k.replace("__", "."): v for k, v in overrides.items()})
    return point


def _write_sweep(workdir: Path, sweep: dict, space: dict) -> Path:
    (workdir / "space.yaml").write_text(yaml.safe_dump(space))
    sweep["search"]["space"] = str(workdir / "space.yaml")
    return SweepBench.write(workdir, sweep)


def _all_runs(uri: str, experiment: str) -> list:
    return SweepBench.runs(uri, experiment, order_by=["attributes.start_time ASC"])


def _runs(uri: str, experiment: str) -> list:
    """The last run of each trial: a trial whose worker process died (a 1 MB cap can kill Ray's own
    threads before the trial's code sees the error) is retried, and its earlier run is KILLED."""
    latest = {}
    for run in _all_runs(uri, experiment):
        latest[run.data.tags["qsweep.trial_id"]] = run
    return list(latest.values())


def _study(workdir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/runs/{name}/optuna.db")


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory, tiny_llama) -> Path:
    """A model folder whose weights file is cut short: loading it raises inside the trial."""
    folder = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_llama, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return folder


@pytest.fixture(scope="module")
def fault_sweep(tmp_path_factory, tiny_sweep_base, broken_model) -> dict:
    import copy

    workdir = tmp_path_factory.mktemp("faults")
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["name"] = "faults"
    space = copy.deepcopy(FAULT_SPACE)
    space["params"]["model.name"]["choices"] = ["tiny-llama", str(broken_model)]
    sweep["search"].update({
        "num_trials": 5, "max_concurrent": 1, "asha": {"enabled": False},
        "baselines": [
            _point(),
            _point(training__learning_rate=1.0e30),
            _point(limits__time_budget_s=0.01),
            _point(limits__memory_mb=1),
            _point(model__name=str(broken_model)),
        ],
    })
    path = _write_sweep(workdir, sweep, space)
    result = CliRunner().invoke(app, ["run", str(path)], catch_exceptions=False)
    return {"result": result, "workdir": workdir, "uri": sweep["tracking"]["uri"]}


def _by_outcome(runs: list) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(run.data.tags.get("qsweep.outcome"), []).append(run)
    return grouped


def test_the_sweep_survives_every_fault(fault_sweep):
    result = fault_sweep["result"]
    assert result.exit_code == 0, result.output
    assert "finished 1, stopped early 0, failed 4" in result.output


def test_each_fault_is_recorded_in_mlflow_with_its_reason(fault_sweep):
    runs = _runs(fault_sweep["uri"], "faults")
    assert len(runs) == 5
    latest = {r.info.run_id for r in runs}
    for earlier in (r for r in _all_runs(fault_sweep["uri"], "faults") if r.info.run_id not in latest):
        assert (earlier.info.status, earlier.data.tags["qsweep.outcome"]) == ("KILLED", "retried")
    grouped = _by_outcome(runs)
    assert {k: len(v) for k, v in grouped.items()} == {
        "finished": 1, "diverged": 1, "timeout": 1, "oom": 1, "error": 1}
    assert grouped["finished"][0].info.status == "FINISHED"
    assert grouped["timeout"][0].info.status == "KILLED"
    for outcome in ("diverged", "oom", "error"):
        assert grouped[outcome][0].info.status == "FAILED"
    assert "TrialDiverged" in grouped["diverged"][0].data.tags["qsweep.reason"]
    assert "time_budget_s" in grouped["timeout"][0].data.tags["qsweep.reason"]
    # Under the 1 MB cap the first failing allocation is Python's (MemoryError) or the C library's.
    assert any(s in grouped["oom"][0].data.tags["qsweep.reason"] for s in ("MemoryError", "allocate memory"))
    for outcome in ("diverged", "timeout", "oom", "error"):
        tags = grouped[outcome][0].data.tags
        assert tags["qsweep.log_tail"] and tags["qsweep.log_tail"] != "(no log)"


def test_optuna_counts_match_mlflow(fault_sweep):
    trials = _study(fault_sweep["workdir"], "faults").trials
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL", "FAIL"]
    complete = [t for t in trials if t.state.name == "COMPLETE"][0]
    finished = _by_outcome(_runs(fault_sweep["uri"], "faults"))["finished"][0]
    assert complete.value == pytest.approx(finished.data.metrics["zorble/acc"])


def test_a_sweep_whose_trials_all_fail_stops_early_and_says_why(tmp_path, tiny_sweep_dict):
    sweep = tiny_sweep_dict
    sweep["name"] = "doomed"
    sweep["search"].update({"num_trials": 8, "max_concurrent": 1, "asha": {"enabled": False}})
    space = {"params": {"training.learning_rate": {"choices": [1.0e30]}}}
    path = _write_sweep(tmp_path, sweep, space)
    result = CliRunner().invoke(app, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 1
    assert "the first 3 trials all failed" in result.output
    assert "TrialDiverged" in result.output
    assert len(_runs(sweep["tracking"]["uri"], "doomed")) < 8
