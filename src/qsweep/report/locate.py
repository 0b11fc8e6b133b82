"""Which sweep a command means: a sweep file, an MLflow run id, an experiment, or the latest sweep.

A sweep file names its output folder, whose state file names the parent run; a run id (the
sweep's or one of its trials') or an experiment name leads to the parent run, and the run's logged
`output_dir` and `name` lead back to the folder when it is on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qsweep import tracking
from qsweep.config.schema import load_sweep
from qsweep.report.leaderboard import latest_experiment, latest_sweep_run
from qsweep.tracking.state import folder_for, output_folder, read_state


class LocateError(ValueError):
    pass


@dataclass(frozen=True)
class SweepLocation:
    uri: str
    parent_run_id: str
    folder: Path | None


def from_sweep_file(path: Path) -> SweepLocation:
    sweep = load_sweep(path)
    folder = output_folder(sweep)
    state = read_state(folder)
    if state is None:
        raise LocateError(f"{path}: no sweep output in {folder}; run it first with `qsweep run {path}`")
    return SweepLocation(state.tracking_uri, state.parent_run_id, folder)


def folder_of(parent_params: dict[str, str], parent_run_id: str) -> Path | None:
    """The output folder as the sweep resolved it, when it is here and belongs to this parent run."""
    if "output_dir" not in parent_params or "name" not in parent_params:
        return None
    folder = folder_for(parent_params["output_dir"], parent_params["name"])
    state = read_state(folder)
    return folder if state is not None and state.parent_run_id == parent_run_id else None


def _parent_run(uri: str, run_id: str | None, experiment: str | None):
    from mlflow.exceptions import MlflowException

    mlflow_client = tracking.client(uri)
    if run_id:
        try:
            run = mlflow_client.get_run(run_id)
        except MlflowException:
            raise LocateError(f"run {run_id!r} is not in {uri}; pass a sweep file, a run id from "
                              "`qsweep leaderboard`, or --experiment NAME") from None
        kind = run.data.tags.get("qsweep.kind")
        if kind == "trial":
            return mlflow_client.get_run(run.data.tags["mlflow.parentRunId"])
        if kind != "sweep":
            raise LocateError(f"run {run_id!r} is not a qsweep sweep or trial run")
        return run
    try:
        name = experiment or latest_experiment(mlflow_client)
    except ValueError as exc:
        raise LocateError(str(exc)) from None
    found = mlflow_client.get_experiment_by_name(name)
    parent = latest_sweep_run(mlflow_client, found.experiment_id) if found else None
    if parent is None:
        raise LocateError(f"--experiment {name!r} holds no qsweep sweep in {uri}")
    return parent


def locate(target: str | None, experiment: str | None, uri: str) -> SweepLocation:
    """`target` is a sweep file or a run id; without one, the latest sweep of `experiment` (or of
    the whole store)."""
    if target and Path(target).suffix in (".yaml", ".yml"):
        if not Path(target).is_file():
            raise LocateError(f"{target}: no such sweep file")
        return from_sweep_file(Path(target))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise LocateError(f"--tracking-uri: {uri} does not exist here; run a sweep first or pass --tracking-uri")
    parent = _parent_run(uri, target, experiment)
    return SweepLocation(uri, parent.info.run_id, folder_of(parent.data.params, parent.info.run_id))
