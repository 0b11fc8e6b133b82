"""The driver is SIGKILLed mid-sweep, then `qsweep resume` finishes it: nothing lost or done twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from sweep_bench import SweepBench

from qsweep.tracking import client

pytestmark = pytest.mark.slow

NUM_TRIALS = 4


def _qsweep(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("qsweep")), *args]


def _trial_runs(uri: str) -> list:
    return SweepBench.runs(uri, "resume")


def _wait_for_a_finished_and_a_running_trial(uri: str, driver: subprocess.Popen, limit_s: float = 400) -> None:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be killed"
        statuses = [r.info.status for r in _trial_runs(uri)]
        if "FINISHED" in statuses and "RUNNING" in statuses:
            return
        time.sleep(0.5)
    raise AssertionError("no point with one finished and one running trial")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_sweep_base) -> dict:
    import copy

    workdir = tmp_path_factory.mktemp("resume")
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["name"] = "resume"
    sweep["training"]["max_steps"] = 30
    sweep["search"].update({"num_trials": NUM_TRIALS, "max_concurrent": 1, "asha": {"enabled": False}})
    path = SweepBench.write(workdir, sweep)
    uri = sweep["tracking"]["uri"]

    # Its own session, so the kill takes the driver and the Ray processes it started, as a lost
    # machine or a `kill -9` of the job would.
    driver = subprocess.Popen(_qsweep("run", str(path)), cwd=workdir, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_a_finished_and_a_running_trial(uri, driver)
        before = {r.data.tags["qsweep.trial_id"]: (r.info.run_id, r.info.status) for r in _trial_runs(uri)}
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    killed_at = time.time() * 1000
    result = subprocess.run(_qsweep("resume", str(path)), cwd=workdir, capture_output=True, text=True, timeout=600)
    return {"result": result, "before": before, "uri": uri, "workdir": workdir, "killed_at": killed_at}


def test_resume_reaches_the_requested_number_of_finished_trials(resumed):
    result = resumed["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"finished {NUM_TRIALS}, stopped early 0, failed 0" in result.stdout


def test_finished_trials_are_kept_and_never_rerun(resumed):
    runs = _trial_runs(resumed["uri"])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == NUM_TRIALS
    assert len({r.data.tags["qsweep.trial_id"] for r in finished}) == NUM_TRIALS
    for trial_id, (run_id, status) in resumed["before"].items():
        if status == "FINISHED":
            same = [r for r in runs if r.data.tags["qsweep.trial_id"] == trial_id]
            assert [r.info.run_id for r in same] == [run_id], "a finished trial was run again"
            assert same[0].info.end_time < resumed["killed_at"]


def test_in_flight_trials_are_marked_killed_and_retried(resumed):
    runs = _trial_runs(resumed["uri"])
    interrupted = [trial_id for trial_id, (_, status) in resumed["before"].items() if status == "RUNNING"]
    assert interrupted
    for trial_id in interrupted:
        same = sorted((r for r in runs if r.data.tags["qsweep.trial_id"] == trial_id), key=lambda r: r.info.start_time)
        assert [r.info.status for r in same] == ["KILLED", "FINISHED"]
        assert same[0].data.tags["qsweep.outcome"] == "interrupted"
        assert same[0].data.params == same[1].data.params or (
            {k: v for k, v in same[0].data.params.items() if not k.startswith("provenance.")}
            == {k: v for k, v in same[1].data.params.items() if not k.startswith("provenance.")}
        )


def test_optuna_history_is_restored_with_exact_counts(resumed):
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{resumed['workdir']}/runs/resume/optuna.db")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == NUM_TRIALS
    assert len(states) == NUM_TRIALS
    finished = {round(r.data.metrics["zorble/acc"], 9) for r in _trial_runs(resumed["uri"]) if r.info.status == "FINISHED"}
    assert {round(t.value, 9) for t in study.trials} <= finished


def test_the_sweep_has_one_parent_run(resumed):
    mlflow_client = client(resumed["uri"])
    experiment = mlflow_client.get_experiment_by_name("resume")
    parents = mlflow_client.search_runs([experiment.experiment_id], filter_string="tags.`qsweep.kind` = 'sweep'")
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_finished"] == NUM_TRIALS
