"""`qsweep run` in a pseudo-terminal shows the live view and nothing of Ray's; `qsweep status` agrees
with MLflow on every trial, for a finished sweep and for one whose driver was killed mid-run."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

from qsweep.tracking import client

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
RAY_BANNER = "Configuration for experiment"
TENSORBOARD_HINT = "To visualize your results with TensorBoard"


def _qsweep(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("qsweep")), *args]


def _write_sweep(workdir: Path, base: dict, name: str, **changes: dict) -> Path:
    sweep = copy.deepcopy(base)
    sweep["name"] = name
    for section, values in changes.items():
        sweep[section].update(values)
    sweep["tracking"] = {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": name}
    sweep["output_dir"] = str(workdir / "runs")
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_in_terminal(args: list[str], cwd: Path, timeout_s: float = 900) -> tuple[int, str]:
    """Runs a command with a pseudo-terminal as its stdin/stdout/stderr, as a user's shell would."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "60"}
    proc = subprocess.Popen(args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.wait(timeout=30)
    return proc.returncode, ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def latest_runs(uri: str, experiment: str) -> dict:
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = mlflow_client.search_runs([found.experiment_id], filter_string="tags.`qsweep.kind` = 'trial'",
                                     order_by=["attributes.start_time ASC"])
    return {r.data.tags["qsweep.trial_id"]: r for r in runs}


def expected_state(run, driver_alive: bool) -> str:
    """What MLflow says, in the view's words (the oracle, written out independently of qsweep's mapping)."""
    status, outcome = run.info.status, run.data.tags.get("qsweep.outcome")
    if status == "RUNNING":
        return "running" if driver_alive else "interrupted"
    if status == "FINISHED":
        return "finished"
    if status == "KILLED" and outcome == "stopped":
        return "stopped early"
    return "failed"


def status_json(target: Path, cwd: Path) -> dict:
    result = subprocess.run(_qsweep("status", str(target), "--format", "json"), cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_sweep_base) -> dict:
    workdir = tmp_path_factory.mktemp("live")
    path = _write_sweep(workdir, tiny_sweep_base, "live")
    code, screen = run_in_terminal(_qsweep("run", str(path)), workdir)
    return {"code": code, "screen": screen, "workdir": workdir, "path": path,
            "uri": f"sqlite:///{workdir}/mlflow.db", "log": workdir / "runs" / "live" / "sweep.log"}


def final_frame(screen: str) -> str:
    """The live table as it was last drawn (the terminal holds every redraw)."""
    start = screen.rindex("live (")
    return screen[screen.rindex("\n", 0, start) + 1:]


def test_the_sweep_runs(finished_sweep):
    assert finished_sweep["code"] == 0, finished_sweep["screen"][-3000:]


def test_ray_banner_and_tensorboard_hint_go_to_the_log_not_the_terminal(finished_sweep):
    screen, log = finished_sweep["screen"], finished_sweep["log"].read_text()
    for noise in (RAY_BANNER, TENSORBOARD_HINT, "Token authentication", "tensorboardx", "INFO "):
        assert noise not in screen
    assert RAY_BANNER in log and TENSORBOARD_HINT in log
    assert "output: runs/live/sweep.log" in screen, "the terminal says where the log is"


def test_live_view_shows_running_trials_then_final_states_counts_and_best(finished_sweep):
    screen = finished_sweep["screen"]
    runs = latest_runs(finished_sweep["uri"], "live")
    assert len(runs) == 2
    assert re.search(r"│ \w{8}\s+│ running", screen), "no frame showed a running trial"
    frame = final_frame(screen)
    assert "live (trials ended): 2/2 trials done" in frame
    states = {trial_id: expected_state(run, driver_alive=True) for trial_id, run in runs.items()}
    for trial_id, state in states.items():
        row = next(line for line in frame.splitlines() if f"│ {trial_id}" in line)
        assert f"│ {state}" in row, row
        if state == "finished":
            assert f"{runs[trial_id].data.metrics['zorble/acc']:.4g}" in row
            assert "MiB" in row and "%" in row
    counts = {s: list(states.values()).count(s) for s in ("finished", "stopped early", "failed")}
    assert (f"0 running, 0 queued, {counts['finished']} finished, {counts['stopped early']} stopped early, "
            f"{counts['failed']} failed") in frame
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    top = max(r.data.metrics["zorble/acc"] for r in finished)
    best = re.search(r"best so far: (\w{8}) zorble/acc = ([0-9.]+)", frame)
    assert best and float(best.group(2)) == pytest.approx(top, abs=5e-5)
    assert runs[best.group(1)].data.metrics["zorble/acc"] == pytest.approx(top)


def test_status_agrees_with_mlflow_on_a_finished_sweep(finished_sweep, tmp_path):
    runs = latest_runs(finished_sweep["uri"], "live")
    # From another directory, by the sweep file, then by the output folder.
    for target in (finished_sweep["path"], finished_sweep["workdir"] / "runs" / "live"):
        shown = status_json(target, tmp_path)
        assert shown["state"] == "finished"
        assert {t["trial_id"]: t["state"] for t in shown["trials"]} == {
            trial_id: expected_state(run, driver_alive=False) for trial_id, run in runs.items()}
    table = subprocess.run(_qsweep("status", str(finished_sweep["path"])), cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert table.returncode == 0
    assert all(trial_id in table.stdout for trial_id in runs)
    assert "best so far:" in table.stdout


def test_status_agrees_with_mlflow_while_running_and_after_the_driver_is_killed(tmp_path, tiny_sweep_base):
    # Trials long enough (about a minute on 2 busy cores) to still run when the kill comes.
    path = _write_sweep(tmp_path, tiny_sweep_base, "killed", training={"max_steps": 200, "eval_every": 50},
                        search={"num_trials": 3, "max_concurrent": 1, "asha": {"enabled": False}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    driver = subprocess.Popen(_qsweep("run", str(path)), cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert driver.poll() is None, "the sweep ended before it could be killed"
            statuses = [r.info.status for r in latest_runs(uri, "killed").values()]
            if "FINISHED" in statuses and "RUNNING" in statuses:
                break
            time.sleep(0.5)
        running = status_json(path, tmp_path)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert running["state"] == "running"
    assert "running" in {t["state"] for t in running["trials"]}

    runs = latest_runs(uri, "killed")
    assert "RUNNING" in {r.info.status for r in runs.values()}, "MLflow still shows the dead trial running"
    shown = status_json(path, tmp_path)
    assert shown["state"] == "interrupted: driver not running"
    assert {t["trial_id"]: t["state"] for t in shown["trials"]} == {
        trial_id: expected_state(run, driver_alive=False) for trial_id, run in runs.items()}
    assert shown["counts"]["queued"] == 0 and shown["num_trials"] == 3
    table = subprocess.run(_qsweep("status", str(path)), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0
    assert "interrupted" in table.stdout and "qsweep resume" in table.stdout
