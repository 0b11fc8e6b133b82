"""The progress model, its one table renderer, the live callback's reading of Ray's trials, and
`qsweep status`'s reading of MLflow (a real sqlite store written the way the MLflow mirror writes it)."""

from __future__ import annotations

import logging
import os
import re
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from qsweep import tracking
from qsweep.cli import app
from qsweep.config.schema import SweepConfig
from qsweep.orchestrate.status import (
    Driver,
    driver_alive,
    progress_from_mlflow,
    read_driver,
    trial_state,
    write_driver,
)
from qsweep.report.progress import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    RETRYING,
    RUNNING,
    STOPPED,
    SWEEP_DONE,
    SWEEP_FINISHED,
    SWEEP_INTERRUPTED,
    SWEEP_RUNNING,
    SweepProgress,
    TrialRow,
    as_dict,
    event_line,
    progress_table,
)
from qsweep.tracking.state import SweepState, write_state


def text_of(renderable) -> str:
    console = Console(record=True, width=220)
    console.print(renderable)
    return console.export_text()


def sample(now: float = 1000.0) -> SweepProgress:
    progress = SweepProgress("demo", "zorble/acc", "maximize", num_trials=6, started=now - 600,
                             device="cuda", device_memory_mb=80_000)
    rows = [
        TrialRow("aaaa0001", {"lora.r": 16, "training.learning_rate": 0.00123456}, 40, FINISHED, 40, 1.2, 0.65, 8000.0),
        TrialRow("aaaa0002", {"lora.r": 8, "training.learning_rate": 0.002}, 40, FINISHED, 40, 1.5, 0.40, 4000.0),
        TrialRow("aaaa0003", {"lora.r": 64, "training.learning_rate": 0.0001}, 40, STOPPED, 20, 2.5),
        TrialRow("aaaa0004", {"lora.r": 4, "training.learning_rate": 0.003}, 40, RUNNING, 10, 2.9),
        TrialRow("aaaa0005", {"lora.r": 4, "training.learning_rate": 0.003}, 40, FAILED, 5, reason="oom: OutOfMemoryError"),
    ]
    progress.trials = {r.trial_id: r for r in rows}
    return progress


def test_counts_queued_best_and_eta():
    progress = sample()
    counts = progress.counts()
    assert (counts[RUNNING], counts[FINISHED], counts[STOPPED], counts[FAILED], counts["queued"]) == (1, 2, 1, 1, 1)
    assert progress.best().trial_id == "aaaa0001"
    # 4 trials ended + a quarter of one, of 6, in 600 s: 4.25/6 done.
    assert progress.done_fraction() == pytest.approx(4.25 / 6)
    assert progress.eta(now=1000.0) == pytest.approx(600 * (1 - 4.25 / 6) / (4.25 / 6))
    progress.direction = "minimize"
    assert progress.best().trial_id == "aaaa0002"
    progress.state = SWEEP_DONE
    assert progress.queued() == 0 and progress.eta() is None


def test_no_eta_before_any_progress_and_no_best_before_a_finished_trial():
    progress = SweepProgress("demo", "zorble/acc", "maximize", 3, started=0.0)
    assert progress.eta(now=10.0) is None and progress.best() is None
    assert "none finished yet" in text_of(progress_table(progress, now=10.0))


def test_table_shows_every_trial_with_its_state_step_loss_score_memory_share_and_params():
    text = text_of(progress_table(sample(), now=1000.0))
    assert "demo (running): 4/6 trials done" in text
    row = next(line for line in text.splitlines() if "aaaa0001" in line)
    for cell in ("finished", "40/40", "1.2", "0.65", "8,000 MiB (10.0%)", "r=16", "learning_rate=0.00123"):
        assert cell in row, (cell, row)
    assert "stopped early" in next(line for line in text.splitlines() if "aaaa0003" in line)
    assert "failed (oom: OutOfMemoryError)" in text
    assert "1 running, 1 queued, 2 finished, 1 stopped early, 1 failed · elapsed 10m00s, ETA ~4m07s" in text
    assert "best so far: aaaa0001 zorble/acc = 0.65 · r=16 learning_rate=0.00123" in text


def test_a_small_terminal_keeps_running_trials_and_the_newest_ended_ones():
    text = text_of(progress_table(sample(), now=1000.0, max_rows=3))
    shown = set(re.findall(r"aaaa000\d", text.split("best so far")[0]))
    assert shown == {"aaaa0004", "aaaa0003", "aaaa0005"}
    assert "2 earlier trials not shown" in text
    assert "best so far: aaaa0001" in text, "the best trial is still named"


def test_event_lines_are_one_plain_line_each():
    progress = sample()
    rows = progress.trials
    lines = [event_line(progress, rows["aaaa0004"], "started", now=1000.0),
             event_line(progress, rows["aaaa0004"], "progress", now=1000.0),
             event_line(progress, rows["aaaa0001"], FINISHED, now=1000.0),
             event_line(progress, rows["aaaa0003"], STOPPED, now=1000.0),
             event_line(progress, rows["aaaa0005"], FAILED, now=1000.0)]
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    assert lines[0] == "[10m00s] trial aaaa0004 started: r=4 learning_rate=0.003"
    assert lines[1] == "[10m00s] trial aaaa0004 step 10/40, val loss 2.9"
    assert "finished: zorble/acc = 0.65, peak 8,000 MiB (10.0%); best so far: aaaa0001" in lines[2]
    assert "stopped early: at step 20/40" in lines[3]
    assert "failed: oom: OutOfMemoryError | 1 running" in lines[4]


@pytest.mark.parametrize(("status", "outcome", "alive", "state"), [
    ("RUNNING", "", True, RUNNING),
    ("RUNNING", "", False, INTERRUPTED),
    ("FINISHED", "finished", False, FINISHED),
    ("KILLED", "stopped", True, STOPPED),
    ("KILLED", "timeout", True, FAILED),
    ("KILLED", "interrupted", True, INTERRUPTED),
    ("KILLED", "retried", True, RETRYING),
    ("KILLED", "retried", False, INTERRUPTED),
    ("FAILED", "oom", True, FAILED),
    ("FAILED", "crashed", False, FAILED),
])
def test_mlflow_status_and_outcome_map_to_the_views_states(status, outcome, alive, state):
    assert trial_state(status, outcome, alive) == state


def test_driver_file_round_trips_and_a_dead_driver_is_seen(tmp_path):
    write_driver(tmp_path, "cpu", 1024.0)
    driver = read_driver(tmp_path)
    assert driver.pid == os.getpid() and driver.cwd == os.getcwd()
    assert driver_alive(driver)
    assert not driver_alive(None)
    gone = Driver(**{**vars(driver), "pid": 2**22 + 17})
    assert not driver_alive(gone)


@pytest.fixture
def mirrored_store(tmp_path):
    """A sweep's folder and MLflow store as the driver and its MLflow mirror leave them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(uri, "demo")
    parent = tracking.start_run(mlflow_client, experiment_id, "demo", {
        "qsweep.kind": "sweep", "qsweep.sweep": "demo", "qsweep.metric": "zorble/acc", "qsweep.direction": "maximize"})
    tracking.log_batch(mlflow_client, parent, params={"search.num_trials": 5})
    trials = {}
    for trial_id, r, status, outcome, metrics in [
        ("bbbb0001", 16, "FINISHED", "finished", {"zorble/acc": 0.6, "peak_memory_mb": 512.0}),
        ("bbbb0002", 8, "KILLED", "stopped", {}),
        ("bbbb0003", 4, "FAILED", "oom", {}),
        ("bbbb0004", 32, "RUNNING", None, {}),
    ]:
        run = tracking.start_run(mlflow_client, experiment_id, f"demo-{trial_id}", {
            "mlflow.parentRunId": parent, "qsweep.kind": "trial", "qsweep.trial_id": trial_id})
        tracking.log_batch(mlflow_client, run, params={"search.lora.r": r, "training.max_steps": 20})
        for step, loss in ((5, 3.0), (10, 2.5)):
            tracking.log_batch(mlflow_client, run, metrics={"eval_loss": loss}, step=step)
        if metrics:
            tracking.log_batch(mlflow_client, run, metrics={**metrics, "eval_loss": 2.0}, step=20)
        if outcome:
            mlflow_client.set_tag(run, "qsweep.outcome", outcome)
            tracking.end_run(mlflow_client, run, status, "oom: OutOfMemoryError" if outcome == "oom" else None)
        trials[trial_id] = run
    folder = tmp_path / "runs" / "demo"
    write_state(folder, SweepState("fp", experiment_id, parent, uri))
    return {"uri": uri, "folder": folder, "parent": parent, "client": mlflow_client}


def test_status_reads_every_trial_from_mlflow(mirrored_store):
    folder = mirrored_store["folder"]
    write_driver(folder, "cpu", 2048.0)  # this test process plays the live driver
    progress = progress_from_mlflow(folder)
    assert progress.state == SWEEP_RUNNING and progress.num_trials == 5 and progress.queued() == 1
    rows = progress.trials
    assert {k: r.state for k, r in rows.items()} == {
        "bbbb0001": FINISHED, "bbbb0002": STOPPED, "bbbb0003": FAILED, "bbbb0004": RUNNING}
    assert (rows["bbbb0001"].step, rows["bbbb0001"].score, rows["bbbb0001"].eval_loss) == (20, 0.6, 2.0)
    assert (rows["bbbb0002"].step, rows["bbbb0002"].eval_loss, rows["bbbb0002"].max_steps) == (10, 2.5, 20)
    assert rows["bbbb0001"].params == {"lora.r": 16}
    assert rows["bbbb0003"].reason == "oom: OutOfMemoryError"
    assert progress.share(rows["bbbb0001"]) == pytest.approx(0.25)


def test_status_of_a_sweep_whose_driver_died_says_interrupted(mirrored_store):
    folder = mirrored_store["folder"]
    write_driver(folder, "cpu", 2048.0)
    (folder / "driver.json").write_text((folder / "driver.json").read_text().replace(str(os.getpid()), "4194321"))
    result = CliRunner().invoke(app, ["status", str(folder)])
    assert result.exit_code == 0, result.output
    assert "bbbb0004" in result.output and "interrupted" in result.output and "qsweep resume" in result.output
    progress = progress_from_mlflow(folder)
    assert progress.state == SWEEP_INTERRUPTED and progress.queued() == 0
    assert as_dict(progress)["counts"][INTERRUPTED] == 1


def test_status_of_a_finished_sweep(mirrored_store):
    tracking.end_run(mirrored_store["client"], mirrored_store["parent"], "FINISHED")
    progress = progress_from_mlflow(mirrored_store["folder"])
    assert progress.state == SWEEP_FINISHED and progress.ended is not None


@pytest.mark.parametrize("make", ["missing folder", "plain folder", "sweep never run", "no runs here"])
def test_status_exits_2_when_there_is_no_such_sweep(tmp_path, tiny_sweep_dict, make, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    args = {"missing folder": [str(tmp_path / "nope")], "plain folder": [str(tmp_path)], "no runs here": []}
    if make == "sweep never run":
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({**tiny_sweep_dict, "output_dir": str(tmp_path / "runs")}))
        args[make] = [str(path)]
    result = CliRunner().invoke(app, ["status", *args[make]])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "qsweep run" in result.output or "qsweep-state.json" in result.output or "no sweep" in result.output


def test_status_does_not_start_ray(mirrored_store):
    code = ("import sys; from qsweep.orchestrate.status import progress_from_mlflow; from pathlib import Path; "
            f"progress_from_mlflow(Path({str(mirrored_store['folder'])!r})); print('ray' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def _stub(trial_id: str, config: dict):
    from ray.tune.experiment import Trial

    return Trial("train_trial", config=config, trial_id=trial_id, stub=True)


def test_live_view_reads_ray_events_like_the_mirror_and_prints_one_line_each(tmp_path, tiny_sweep_dict, capsys):
    from qsweep.orchestrate.live import LiveView, sweep_output
    from qsweep.resources.packing import Machine

    sweep = SweepConfig(**{**tiny_sweep_dict, "search": {**tiny_sweep_dict["search"], "num_trials": 4}})
    with sweep_output(tmp_path / "sweep.log", verbose=False):
        view = LiveView(sweep, tmp_path, Machine("cpu", 1000.0))
        view.setup()
        done, stopped, failed = (_stub(i, {"lora.r": r, "training.max_steps": 20})
                                 for i, r in (("cccc0001", 8), ("cccc0002", 16), ("cccc0003", 4)))
        for trial in (done, stopped, failed):
            view.on_trial_start(0, [], trial)
            trial.update_last_result({"step": 5, "eval_loss": 3.0})
            view.on_trial_result(0, [], trial, trial.last_result)
        final = {"step": 20, "eval_loss": 2.0, "objective": 0.5, "scores": {"zorble/acc": 0.5},
                 "measures": {"peak_memory_mb": 100.0}}
        done.update_last_result(final)
        view.on_trial_result(0, [], done, final)
        failed.update_last_result({"failed": "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory"})
        view.on_trial_result(0, [], failed, failed.last_result)
        for trial in (done, stopped, failed):
            view.on_trial_complete(0, [], trial)
        print("a library's print")
        logging.getLogger("ray.tune").warning("a library's warning")
        view.on_experiment_end([])
    out = capsys.readouterr().out
    rows = view.progress.trials
    assert {k: r.state for k, r in rows.items()} == {"cccc0001": FINISHED, "cccc0002": STOPPED, "cccc0003": FAILED}
    assert rows["cccc0001"].max_steps == 20 and rows["cccc0001"].peak_mb == 100.0
    assert rows["cccc0003"].reason == "oom: torch.OutOfMemoryError: CUDA out of memory"
    assert "trial cccc0001 started: r=8 max_steps=20" in out
    assert "trial cccc0002 stopped early: at step 5/20" in out
    assert "trial cccc0001 finished: zorble/acc = 0.5, peak 100 MiB (10.0%)" in out
    assert "0 running, 0 queued, 1 finished, 1 stopped early, 1 failed" in out
    assert "a library's" not in out
    log = (tmp_path / "sweep.log").read_text()
    assert "a library's print" in log and "a library's warning" in log
    assert read_driver(tmp_path).device_memory_mb == 1000.0
    log_files = [getattr(h, "baseFilename", None) for h in logging.getLogger().handlers]
    assert str(tmp_path / "sweep.log") not in log_files, "the log's handler is removed after the sweep"
