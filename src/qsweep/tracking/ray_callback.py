"""Ray Tune → MLflow: each trial's start, progress, end or failure becomes its child run.

Runs in the driver only (see qsweep.tracking for why). After a resume, the first step reconciles what
Ray restored with what MLflow holds, so a finished trial is never lost or logged twice and a trial
that was running when the driver died is marked KILLED before its config is retried. A run whose
trial Ray never saved (the driver died first) is marked KILLED too: no run stays RUNNING.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback, Stopper

from qsweep import tracking
from qsweep.config.schema import TOTAL_STEPS_PARAM, SweepConfig
from qsweep.search.objective import FAILED, OBJECTIVE
from qsweep.search.space import apply_params
from qsweep.tracking import naming

logger = logging.getLogger(__name__)

TRIAL_LOG = "trial.log"
LOG_TAIL_LINES = 40


@dataclass
class SweepHealth:
    """Counts outcomes so a sweep whose trials all fail stops instead of failing all night."""

    give_up_after: int
    finished: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)

    def all_failing(self) -> bool:
        return self.finished == 0 and self.failed >= self.give_up_after


class AllFailingStopper(Stopper):
    def __init__(self, health: SweepHealth):
        self.health = health

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.health.all_failing()


def classify_failure(text: str) -> tuple[str, str]:
    """(MLflow status, outcome tag) for a trial's error text."""
    lowered = text.lower()
    if "trialtimeout" in lowered:
        return "KILLED", "timeout"
    if any(s in lowered for s in ("out of memory", "outofmemory", "can't allocate memory", "cannot allocate memory",
                                         "memoryerror")):
        return "FAILED", "oom"
    if "trialdiverged" in lowered:
        return "FAILED", "diverged"
    if "actordied" in lowered or "worker died" in lowered or "unexpectedly" in lowered:
        return "FAILED", "crashed"
    return "FAILED", "error"


def trial_error_text(trial: Any) -> str:
    """Ray writes the error to the driver's staging folder first and syncs it to storage later, so
    the local file is the one that exists when the callback runs."""
    local = trial.error_file
    if local and Path(local).exists():
        return Path(local).read_text(errors="replace")
    return str(trial.get_error() or "the trial's process failed without an error message")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def error_summary(text: str) -> str:
    """The exception line of a traceback: what a person reads first."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or "Timeout" in line or "Diverged" in line:
            return line.strip()
    return lines[-1].strip() if lines else "unknown error"


class MlflowMirror(Callback):
    def __init__(self, sweep: SweepConfig, experiment_id: str, parent_run_id: str, trials_root: Path,
                 health: SweepHealth, train_rows: int = 0):
        """`train_rows`: the training set's size, for trials that train for epochs (orchestrate.steps)."""
        self.sweep = sweep
        self.train_rows = train_rows
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.trials_root = trials_root
        self.health = health
        self.runs: dict[str, str] = {}
        self._client: Any = None
        self._reconciled = False

    def __getstate__(self) -> dict:
        # Ray pickles callbacks with the tuner; a live MLflow client is not picklable.
        return {**self.__dict__, "_client": None, "runs": {}, "_reconciled": False}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = tracking.client(self.sweep.tracking.uri)
        return self._client

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._reconciled:
            self.reconcile(trials)

    def reconcile(self, trials: list) -> None:
        """Matches the sweep's child runs to the trials Ray holds (none for a new Tuner), before any
        trial of this driver starts."""
        self._reconciled = True
        by_id = {trial.trial_id: trial for trial in trials}
        for trial_id, run in tracking.trial_runs(self.client, self.experiment_id, self.parent_run_id).items():
            trial = by_id.get(trial_id)
            if trial is not None:
                self.runs[trial_id] = run.info.run_id
            if run.info.status != "RUNNING":
                self._count(run.data.tags.get("qsweep.outcome", ""), run.data.tags.get("qsweep.reason", ""))
            elif trial is not None and trial.status == "TERMINATED":
                self.on_trial_complete(0, trials, trial)
            elif trial is not None and trial.status == "ERROR":
                self.on_trial_error(0, trials, trial)
            else:
                self.client.set_tag(run.info.run_id, "qsweep.outcome", "interrupted")
                tracking.end_run(self.client, run.info.run_id, "KILLED",
                                 "the sweep's driver stopped while this trial ran; its config is retried"
                                 if trial is not None else
                                 "the sweep's driver stopped while this trial ran, before Ray saved it; "
                                 "a trial Optuna had not been told of is retried")

    def _count(self, outcome: str, reason: str) -> None:
        if outcome == "finished":
            self.health.finished += 1
        elif outcome in ("error", "oom", "diverged", "crashed", "timeout"):
            self.health.failed += 1
            self.health.reasons.append(reason)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        sweep = self.sweep
        resolved_trial = apply_params(sweep.trial(), trial.config)
        resolved = resolved_trial.model_dump(mode="json")
        name = naming.trial_run_name(sweep.name, naming.trial_number(trial.experiment_tag or ""), resolved)
        run_id = tracking.start_run(
            self.client, self.experiment_id, name,
            {"mlflow.parentRunId": self.parent_run_id, "qsweep.kind": "trial", "qsweep.sweep": sweep.name,
             "qsweep.trial_id": trial.trial_id, "qsweep.metric": sweep.search.metric,
             tracking.DESCRIPTION_TAG: f"{naming.trial_summary(resolved)} (Ray trial {trial.trial_id})"},
        )
        self.runs[trial.trial_id] = run_id
        tracking.log_batch(self.client, run_id, params={
            **tracking.flatten(resolved), **{f"search.{k}": v for k, v in trial.config.items()},
            TOTAL_STEPS_PARAM: resolved_trial.training.total_steps(self.train_rows)})
        tracking.log_dict(self.client, run_id, resolved, "config.json")
        logger.info("trial %s started: %s", trial.trial_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.runs[trial.trial_id]
        if OBJECTIVE in result:
            self._log_final(run_id, result)
        elif "eval_loss" in result:
            tracking.log_batch(self.client, run_id, metrics={"eval_loss": result["eval_loss"]},
                               step=int(result["step"]))

    def _log_final(self, run_id: str, result: dict) -> None:
        started = time.perf_counter()
        out_dir = Path(result["out_dir"])
        tracking.log_batch(
            self.client, run_id,
            params={f"provenance.{k}": v for k, v in tracking.flatten(result["provenance"]).items()},
            metrics={**result["scores"], **result["measures"], "eval_loss": result["eval_loss"]},
            step=int(result["step"]),
        )
        tracking.log_files(
            self.client, run_id,
            files=[out_dir / name for name in ("config.yaml", "lm_eval_results.json", "lm_eval_samples.jsonl",
                                               TRIAL_LOG)],
            folders={"adapter": out_dir / "adapter"},
        )
        logger.info("run %s: final results logged to MLflow in %.2f s", run_id, time.perf_counter() - started)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.runs[trial.trial_id]
        last = trial.last_result or {}
        if FAILED in last:
            self._record_failure(trial, run_id, last[FAILED])
        elif OBJECTIVE in last:
            if not self._has_final(run_id):
                self._log_final(run_id, last)
            self.client.set_tag(run_id, "qsweep.outcome", "finished")
            tracking.end_run(self.client, run_id, "FINISHED")
            self.health.finished += 1
            logger.info("trial %s finished: %s = %.4f", trial.trial_id, self.sweep.search.metric, last[OBJECTIVE])
        else:
            self.client.set_tag(run_id, "qsweep.outcome", "stopped")
            step = last.get("step")
            tracking.end_run(self.client, run_id, "KILLED", f"stopped early by ASHA at step {step}")
            logger.info("trial %s stopped early by ASHA at step %s", trial.trial_id, step)

    def _has_final(self, run_id: str) -> bool:
        return self.sweep.search.metric in self.client.get_run(run_id).data.metrics

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Only a lost worker or node gets here (a trial's own failure is its result), once Ray's
        retries are spent."""
        run_id = self.runs.get(trial.trial_id)
        if run_id is not None:
            self._record_failure(trial, run_id, trial_error_text(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        reason = error_summary(trial_error_text(trial))
        self.client.set_tag(run_id, "qsweep.outcome", "retried")
        tracking.end_run(self.client, run_id, "KILLED", f"its worker was lost ({reason}); the trial is retried")
        logger.warning("trial %s lost its worker (%s); retrying it", trial.trial_id, reason)

    def _record_failure(self, trial: Any, run_id: str, text: str) -> None:
        status, outcome = classify_failure(text)
        log_file = self.trials_root / trial.trial_id / TRIAL_LOG
        reason = f"{outcome}: {error_summary(text)}"
        self.client.set_tag(run_id, "qsweep.outcome", outcome)
        self.client.set_tag(run_id, "qsweep.log_tail", log_tail(log_file)[-5000:] or "(no log)")
        self.client.log_text(run_id, text, "error.txt")
        if log_file.exists():
            self.client.log_artifact(run_id, str(log_file))
        tracking.end_run(self.client, run_id, status, reason)
        self._count(outcome, reason)
        logger.warning("trial %s %s: %s", trial.trial_id, "timed out" if outcome == "timeout" else "failed",
                       reason)
