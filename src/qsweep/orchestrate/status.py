"""`qsweep status`: a sweep's progress from its output folder and MLflow alone, without Ray.

The output folder's state file names the parent MLflow run; the driver file says which process
runs the sweep, so a sweep whose driver was killed or crashed reads as interrupted rather than as
running forever (its trial runs stay RUNNING in MLflow until `qsweep resume` marks them KILLED).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qsweep import tracking
from qsweep.config.schema import TOTAL_STEPS_PARAM, SweepFileError, load_sweep
from qsweep.report.progress import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    RETRYING,
    RUNNING,
    STOPPED,
    SWEEP_FAILED,
    SWEEP_FINISHED,
    SWEEP_INTERRUPTED,
    SWEEP_RUNNING,
    SweepProgress,
    TrialRow,
)
from qsweep.tracking.state import STATE_FILE, output_folder, read_state

DRIVER_FILE = "driver.json"
SEARCH_PREFIX = "search."


class NoSweep(ValueError):
    pass


@dataclass
class Driver:
    """The process running the sweep, and the device its trials share."""

    pid: int
    host: str
    cwd: str
    device: str
    device_memory_mb: float


def write_driver(folder: Path, device: str, device_memory_mb: float) -> None:
    driver = Driver(os.getpid(), socket.gethostname(), os.getcwd(), device, device_memory_mb)
    partial = folder / f"{DRIVER_FILE}.part"
    partial.write_text(json.dumps(asdict(driver), indent=2))
    partial.replace(folder / DRIVER_FILE)


def read_driver(folder: Path) -> Driver | None:
    path = folder / DRIVER_FILE
    return Driver(**json.loads(path.read_text())) if path.exists() else None


def driver_alive(driver: Driver | None) -> bool:
    """True while the driver process still runs; a driver on another host is taken to be alive,
    since nothing here can see it."""
    if driver is None:
        return False
    if driver.host != socket.gethostname():
        return True
    try:
        os.kill(driver.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{driver.pid}/cmdline")
    # A recycled pid belongs to some other program.
    return not cmdline.exists() or b"qsweep" in cmdline.read_bytes() or b"python" in cmdline.read_bytes()


def find_folder(target: Path | None) -> Path:
    """The output folder named by a sweep file or a folder; the latest sweep under ./runs by default."""
    if target is None:
        candidates = sorted(Path("runs").glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise NoSweep("no sweep in ./runs; name its sweep file or output folder: qsweep status SWEEP.yaml")
        return candidates[-1].parent.resolve()
    if target.is_file():
        try:
            folder = output_folder(load_sweep(target))
        except SweepFileError as exc:
            raise NoSweep(f"{target}: " + "; ".join(exc.problems)) from None
        if not (folder / STATE_FILE).exists():
            raise NoSweep(f"{target}: no sweep has run yet in {folder}; start it with `qsweep run {target}`")
        return folder
    if (target / STATE_FILE).exists():
        return target.resolve()
    raise NoSweep(f"{target}: neither a sweep file nor a sweep's output folder (no {STATE_FILE} in it)")


def tracking_uri(uri: str, driver: Driver | None) -> str:
    """A relative sqlite path is relative to the driver's working directory, not to this shell's."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and driver is not None:
        return prefix + str(Path(driver.cwd) / uri.removeprefix(prefix))
    return uri


def trial_state(status: str, outcome: str, alive: bool) -> str:
    """A trial's MLflow run status and `qsweep.outcome` tag (as the Ray callback writes them) -> its state."""
    if status == "RUNNING":
        return RUNNING if alive else INTERRUPTED
    if status == "FINISHED":
        return FINISHED
    if outcome == "stopped":
        return STOPPED
    if outcome == "retried":
        return RETRYING if alive else INTERRUPTED
    if outcome == "interrupted":
        return INTERRUPTED
    return FAILED


def sweep_state(status: str, alive: bool) -> str:
    if status == "RUNNING":
        return SWEEP_RUNNING if alive else SWEEP_INTERRUPTED
    return SWEEP_FINISHED if status == "FINISHED" else SWEEP_FAILED


def _number(value: str | None, cast: type = int) -> Any:
    try:
        return cast(value) if value is not None else None
    except ValueError:
        return None


def trial_row(mlflow_client: Any, run: Any, metric: str, alive: bool) -> TrialRow:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    state = trial_state(run.info.status, tags.get("qsweep.outcome", ""), alive)
    max_steps = _number(params.get(TOTAL_STEPS_PARAM) or params.get("training.max_steps")) or 0
    history = mlflow_client.get_metric_history(run.info.run_id, "eval_loss") if "eval_loss" in metrics else []
    step = max((m.step for m in history), default=0)
    search = {k.removeprefix(SEARCH_PREFIX): v for k, v in params.items() if k.startswith(SEARCH_PREFIX)}
    reason = tags.get("qsweep.reason", "") if state == FAILED else ""
    return TrialRow(
        trial_id=tags.get("qsweep.trial_id", run.info.run_id), params={k: _typed(v) for k, v in search.items()},
        max_steps=max_steps, state=state, step=step, eval_loss=metrics.get("eval_loss"), score=metrics.get(metric),
        peak_mb=metrics.get("peak_memory_mb"), reason=reason[:120],
    )


def _typed(value: str) -> Any:
    """MLflow keeps params as text; numbers read back as numbers so they print like the live view's."""
    for cast in (int, float):
        parsed = _number(value, cast)
        if parsed is not None:
            return parsed
    return value


def progress_from_mlflow(folder: Path) -> SweepProgress:
    state = read_state(folder)
    if state is None:
        raise NoSweep(f"{folder}: no {STATE_FILE}; not a sweep's output folder")
    driver = read_driver(folder)
    uri = tracking_uri(state.tracking_uri, driver)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise NoSweep(f"{folder}: its MLflow store {uri} does not exist (moved or deleted?)")
    mlflow_client = tracking.client(uri)
    try:
        parent = mlflow_client.get_run(state.parent_run_id)
    except Exception as exc:
        raise NoSweep(f"{folder}: its parent run {state.parent_run_id} is not in {uri} ({exc})") from None
    alive = parent.info.status == "RUNNING" and driver_alive(driver)
    tags = parent.data.tags
    metric = tags.get("qsweep.metric", "")
    progress = SweepProgress(
        name=tags.get("qsweep.sweep", folder.name), metric=metric, direction=tags.get("qsweep.direction", "maximize"),
        num_trials=_number(parent.data.params.get("search.num_trials")) or 0,
        started=parent.info.start_time / 1000, device=driver.device if driver else "",
        device_memory_mb=driver.device_memory_mb if driver else None,
        state=sweep_state(parent.info.status, alive),
        ended=parent.info.end_time / 1000 if parent.info.end_time else None,
    )
    for trial_id, run in tracking.trial_runs(mlflow_client, state.experiment_id, state.parent_run_id).items():
        progress.trials[trial_id] = trial_row(mlflow_client, run, metric, alive)
    return progress
