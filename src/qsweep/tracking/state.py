"""The sweep's output folder: which sweep it belongs to, and where its MLflow runs are.

In tracking because every reader of a sweep (run, resume, status, report) finds its parent MLflow run here.

Ray Tune keeps the trials' state and Optuna keeps the study; this file only ties the folder to
one sweep definition and its parent MLflow run, so a resume continues the same parent run and a
different sweep can never write over the folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from qsweep.config.schema import SweepConfig, SweepFileError

STATE_FILE = "qsweep-state.json"
# The sweep's own log (Ray's, MLflow's and the libraries' output), opened before the folder is checked.
SWEEP_LOG = "sweep.log"


@dataclass
class SweepState:
    fingerprint: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str


def output_folder(sweep: SweepConfig) -> Path:
    """Under the working directory (like the default sqlite file), never beside the sweep file,
    which may sit inside the installed package."""
    return folder_for(sweep.output_dir, sweep.name)


def folder_for(output_dir: str, name: str) -> Path:
    """A sweep's folder from its `output_dir` and `name`, as a sweep file or its logged params give them."""
    return (Path(output_dir).expanduser() / name).resolve()


def fingerprint(sweep: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(sweep.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def read_state(folder: Path) -> SweepState | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    return SweepState(**json.loads(path.read_text()))


def write_state(folder: Path, state: SweepState) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{STATE_FILE}.part"
    partial.write_text(json.dumps(asdict(state), indent=2))
    partial.replace(folder / STATE_FILE)


def check_folder(sweep: SweepConfig, source: str) -> SweepState | None:
    """The state to resume from, None for a fresh folder; refuses a folder another sweep owns."""
    folder = output_folder(sweep)
    state = read_state(folder)
    if state is None:
        if folder.exists() and any(path.name != SWEEP_LOG for path in folder.iterdir()):
            raise SweepFileError(source, [
                f"output_dir: {folder} already holds files that are not this sweep's; "
                "choose another `name` or `output_dir`, or move that folder away"
            ])
        return None
    if state.fingerprint != fingerprint(sweep):
        raise SweepFileError(source, [
            f"output_dir: {folder} holds a sweep named {sweep.name!r} with a different definition; "
            "nothing was overwritten. Give the changed sweep a new `name` (or `output_dir`) to run it "
            "beside the old one, or restore the old file to resume it"
        ])
    return state
