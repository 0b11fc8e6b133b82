"""A real sweep where ASHA stops a trial, resumed twice: once from Ray's state, once without it.

Two trials run one after the other and differ only in learning rate (same seed, data order and
LoRA init), so the second, at a learning rate 300 times lower, has the higher validation loss at
the rung and ASHA (plain: min_trials_per_rung 1) stops it. Then the driver's death before Ray saved its state is recreated by hand:
Ray's experiment folder is removed, and the study and MLflow get what such a driver leaves behind
(a trial Optuna asked for, a child run never ended).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from qsweep import tracking
from qsweep.config.schema import load_sweep
from qsweep.tracking.state import fingerprint, read_state, write_state

pytestmark = pytest.mark.slow

NAME = "asha"
GOOD, SLOW, RETRIED = 3e-3, 1e-5, 1e-3


def _qsweep(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("qsweep")), *args], cwd=workdir,
                          capture_output=True, text=True, timeout=600)


def _study(workdir: Path) -> optuna.Study:
    return optuna.load_study(study_name=NAME, storage=f"sqlite:///{workdir}/runs/{NAME}/optuna.db")


def _runs(uri: str) -> list:
    mlflow_client = tracking.client(uri)
    experiment = mlflow_client.get_experiment_by_name(NAME)
    return mlflow_client.search_runs([experiment.experiment_id], filter_string="tags.`qsweep.kind` = 'trial'",
                                     order_by=["attributes.start_time ASC"])


def _snapshot(workdir: Path, uri: str) -> dict:
    return {
        "study": [(t.state.name, t.params.get("training.learning_rate"), t.user_attrs) for t in _study(workdir).trials],
        "runs": [(r.info.run_id, r.info.status, r.data.tags.get("qsweep.outcome"), r.data.tags.get("qsweep.reason"),
                  float(r.data.params["training.learning_rate"]) if "training.learning_rate" in r.data.params else None)
                 for r in _runs(uri)],
    }


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory, tiny_sweep_base) -> Path:
    workdir = tmp_path_factory.mktemp(NAME)
    (workdir / "lr.yaml").write_text(yaml.safe_dump({"params": {"training.learning_rate": {
        "low": 1e-6, "high": 1e-2, "log": True}}}))
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["name"] = NAME
    sweep["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    # A minimizing sweep, for `qsweep show` (ASHA ranks by validation loss whatever the direction).
    sweep["search"] = {
        **sweep["search"], "space": "lr.yaml", "num_trials": 2, "max_concurrent": 1, "direction": "minimize",
        "asha": {"enabled": True, "grace_steps": 5, "reduction_factor": 2, "min_trials_per_rung": 1},
        "baselines": [{"training.learning_rate": GOOD}, {"training.learning_rate": SLOW}],
    }
    sweep["tracking"] = {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": NAME}
    sweep["output_dir"] = str(workdir / "runs")
    path = workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stopped_then_resumed(sweep_file: Path) -> dict:
    workdir, uri = sweep_file.parent, f"sqlite:///{sweep_file.parent}/mlflow.db"
    first = _qsweep(workdir, "run", str(sweep_file))
    before = _snapshot(workdir, uri)
    resumed = _qsweep(workdir, "resume", str(sweep_file))
    return {"first": first, "before": before, "resumed": resumed, "after": _snapshot(workdir, uri)}


def test_asha_stops_the_slow_trial_and_optuna_is_told(stopped_then_resumed):
    first = stopped_then_resumed["first"]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "finished 1, stopped early 1, failed 0" in first.stdout
    assert stopped_then_resumed["before"]["study"] == [("COMPLETE", GOOD, {}), ("PRUNED", SLOW, {})]


def test_mlflow_says_the_trial_was_stopped_early(stopped_then_resumed):
    (_, good_status, good_outcome, _, good_lr), (_, status, outcome, reason, lr) = stopped_then_resumed["before"]["runs"]
    assert (good_lr, good_status, good_outcome) == (GOOD, "FINISHED", "finished")
    assert (lr, status, outcome) == (SLOW, "KILLED", "stopped")
    assert reason == "stopped early by ASHA at step 5"


def test_a_resume_after_the_stop_runs_nothing_again(stopped_then_resumed):
    resumed = stopped_then_resumed["resumed"]
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "finished 1, stopped early 1, failed 0" in resumed.stdout
    assert stopped_then_resumed["after"] == stopped_then_resumed["before"]


def test_show_writes_the_sweeps_own_direction(stopped_then_resumed, sweep_file):
    uri = f"sqlite:///{sweep_file.parent}/mlflow.db"
    finished = stopped_then_resumed["before"]["runs"][0][0]
    shown = _qsweep(sweep_file.parent, "show", finished, "--tracking-uri", uri)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["search"]["direction"] == "minimize"


@pytest.fixture(scope="module")
def resumed_without_ray_state(stopped_then_resumed, sweep_file: Path) -> dict:
    workdir, uri = sweep_file.parent, f"sqlite:///{sweep_file.parent}/mlflow.db"
    # A 3-trial sweep whose driver dies during its third trial, before Ray saved anything: the two
    # trials above stand for its first two, so their folder is handed to that sweep.
    three = yaml.safe_load(sweep_file.read_text())
    three["search"]["num_trials"] = 3
    path = workdir / "three.yaml"
    path.write_text(yaml.safe_dump(three, sort_keys=False))
    folder = workdir / "runs" / NAME
    state = read_state(folder)
    state.fingerprint = fingerprint(load_sweep(path))
    write_state(folder, state)
    shutil.rmtree(folder / "ray")
    # What Ray's searcher does for a trial it starts: enqueue (a baseline) and ask. It never tells.
    study = _study(workdir)
    study.enqueue_trial({"training.learning_rate": RETRIED})
    asked = study.ask()
    asked.suggest_float("training.learning_rate", 1e-6, 1e-2, log=True)
    # What the mirror does when that trial starts; the driver dies before it ends the run.
    mlflow_client = tracking.client(uri)
    parent = mlflow_client.search_runs([mlflow_client.get_experiment_by_name(NAME).experiment_id],
                                       filter_string="tags.`qsweep.kind` = 'sweep'")[0].info.run_id
    dead = tracking.start_run(mlflow_client, mlflow_client.get_experiment_by_name(NAME).experiment_id,
                              f"{NAME}-dead_00002", {"mlflow.parentRunId": parent, "qsweep.kind": "trial",
                                                     "qsweep.sweep": NAME, "qsweep.trial_id": "dead_00002"})
    tracking.log_batch(mlflow_client, dead, params={"training.learning_rate": RETRIED})
    before = _snapshot(workdir, uri)
    result = _qsweep(workdir, "resume", str(path))
    return {"result": result, "before": before, "after": _snapshot(workdir, uri), "asked": asked.number, "dead": dead,
            "parent": mlflow_client.get_run(parent)}


def test_resume_without_ray_state_runs_only_the_interrupted_point(resumed_without_ray_state):
    result = resumed_without_ray_state["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished 2, stopped early 1, failed 0" in result.stdout
    study = resumed_without_ray_state["after"]["study"]
    asked = resumed_without_ray_state["asked"]
    # Each baseline once, the interrupted trial failed and its point run once more; nothing else.
    assert study == [("COMPLETE", GOOD, {}), ("PRUNED", SLOW, {}), ("FAIL", RETRIED, {}),
                     ("COMPLETE", RETRIED, {"qsweep.retry_of": asked})]
    assert resumed_without_ray_state["parent"].data.metrics["trials_finished"] == 2


def test_resume_without_ray_state_leaves_no_run_running(resumed_without_ray_state):
    before, after = resumed_without_ray_state["before"]["runs"], resumed_without_ray_state["after"]["runs"]
    assert after[:2] == before[:2], "the first attempt's finished and stopped runs must be left as they were"
    dead = [r for r in after if r[0] == resumed_without_ray_state["dead"]]
    assert [r[1:3] for r in dead] == [("KILLED", "interrupted")]
    assert "driver stopped" in dead[0][3]
    assert [(r[1], r[2], r[4]) for r in after[3:]] == [("FINISHED", "finished", RETRIED)]
    assert len(after) == 4 and "RUNNING" not in [r[1] for r in after]
