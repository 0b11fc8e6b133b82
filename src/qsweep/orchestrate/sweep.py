"""Orchestration: Ray Tune runs the trials, Optuna suggests them, ASHA stops the losers.

A fresh sweep and a resumed one take the same path: Ray Tune restores its own experiment state
(finished trials kept, in-flight ones restarted with their configs) and the Optuna study lives in
its own storage in the output folder, so nothing here invents a checkpoint format. A driver killed
before Ray saved its state leaves only the study and MLflow: a new Tuner then runs the trials the
study still lacks, after the study and the MLflow mirror close what that driver left running.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qsweep import tracking
from qsweep.config.schema import SearchConfig, SweepConfig, TrialConfig, dump_yaml
from qsweep.orchestrate import final as final_stage
from qsweep.orchestrate import sharing, stages
from qsweep.orchestrate.cluster import cluster_machine
from qsweep.orchestrate.driver import ray_started_beside, timed_phase
from qsweep.orchestrate.live import LiveView
from qsweep.orchestrate.steps import longest_trial_steps, train_rows
from qsweep.resources.packing import Machine, calibration, refuse_oversized, resources_for
from qsweep.orchestrate.task_log import trial_log
from qsweep.search.objective import FAILED, OBJECTIVE, objective_value
from qsweep.search.scheduler import build_scheduler
from qsweep.search.searcher import Tried, build_searcher, prepare_study
from qsweep.search.space import SearchSpace, apply_params
from qsweep.tracking.ray_callback import TRIAL_LOG, AllFailingStopper, MlflowMirror, SweepHealth
from qsweep.tracking.state import SweepState, check_folder, fingerprint, output_folder, write_state

logger = logging.getLogger(__name__)

RAY_DIR = "ray"
# A sweep whose first trials all fail stops after this many failures instead of failing all night.
GIVE_UP_AFTER_FAILURES = 3
RETRIES_ON_LOST_WORKER = 2


@dataclass
class SweepSummary:
    experiment_id: str
    parent_run_id: str
    finished: int
    stopped: int
    failed: int
    baseline: dict[str, float]
    best: dict[str, Any] | None
    gave_up: str | None = None
    final: dict[str, Any] | None = None


# Start-up is paid once per worker process: Ray Tune hands a finished trial's process to the next
# trial that asks for the same resources (reuse_actors).
_worker_started = False


def worker_setup_seconds() -> float:
    """The worker's own start-up (process, imports) for the first trial in this process, else 0:
    what a profile needs to tell start-up from the trial's own work."""
    import psutil

    global _worker_started
    if _worker_started:
        return 0.0
    _worker_started = True
    return time.time() - psutil.Process().create_time()


def train_trial(params: dict[str, Any], base: dict[str, Any], base_dir: str, trials_root: str,
                search: dict[str, Any], threads: int, pending_baselines: dict[str, dict[str, Any]],
                machine: Machine, calibration_factor: float) -> None:
    """The Ray Tune trainable: one trial in a Ray worker process, which Ray Tune may reuse for a later
    trial once this one has given back its memory and its cap. `machine` and `calibration_factor`
    are what the driver sized its request with: a trial too big for one card is refused from them,
    and the cap leaves the context the request counted."""
    import torch
    from ray import tune

    from qsweep.resources.caps import give_back_memory, release_cap

    setup_seconds = worker_setup_seconds()
    torch.set_num_threads(max(1, threads))
    if torch.cuda.is_available():
        # The trial's share is its own: starting CUDA now lets it read its card in-process
        # (config.policy.cuda_card reads it in a child process where CUDA has not started).
        torch.cuda.init()
    trial = apply_params(TrialConfig(**base), params)
    out_dir = Path(trials_root) / tune.get_context().get_trial_id()
    try:
        with trial_log(out_dir / TRIAL_LOG):
            logger.info("config: %s", params)
            _train_and_report(trial, base_dir, out_dir, SearchConfig(**search), pending_baselines, setup_seconds,
                              machine, calibration_factor)
    finally:
        # Also when ASHA stops the trial: Ray Tune ends it by raising SystemExit in its report call.
        release_cap()
        give_back_memory()


def _train_and_report(trial: TrialConfig, base_dir: str, out_dir: Path,
                      search_config: SearchConfig, pending_baselines: dict[str, dict[str, Any]],
                      setup_seconds: float, machine: Machine, calibration_factor: float) -> None:
    from ray import tune

    from qsweep.resources.caps import release_cap
    from qsweep.train.models import resolve_model
    from qsweep.train.trial import run_trial

    try:
        model_path = resolve_model(trial.model.name, trial.model.revision, Path(base_dir)).path
        refuse_oversized(trial, Path(base_dir), model_path, machine, calibration_factor)
        untuned_base = stages.untuned_base_for(trial, pending_baselines, Path(base_dir))
        outcome = run_trial(trial, Path(base_dir), out_dir, report=tune.report, untuned_base=untuned_base,
                            context_mb=machine.context_mb)
        outcome.metrics["setup_seconds"] = setup_seconds
        objective = objective_value(outcome.scores, search_config)
    except Exception:
        # The trial's own failure (an exception, OOM, divergence, its time budget) is its result.
        # Only a lost worker or node reaches Ray as an error, and Ray retries those elsewhere.
        release_cap()
        logger.exception("trial failed")
        tune.report({FAILED: traceback.format_exc(), "node_id": _node()["node_id"]})
        return
    last_eval = [p["eval_loss"] for p in outcome.curve if "eval_loss" in p]
    tune.report({
        "step": int(outcome.metrics["train_steps"]),
        "eval_loss": last_eval[-1] if last_eval else float("nan"),
        OBJECTIVE: objective,
        **{t.metric: outcome.metrics[t.metric] for t in search_config.tradeoffs},
        "scores": {**outcome.scores, **({OBJECTIVE: objective} if search_config.weights else {})},
        "measures": outcome.metrics,
        "provenance": {**outcome.provenance, **_node()},
        "out_dir": str(out_dir),
        **({"baseline": outcome.baseline} if outcome.baseline else {}),
    })


def _node() -> dict[str, str]:
    import socket

    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


def start_parent_run(sweep: SweepConfig, sweep_file: Path, experiment_id: str, asha_max_t: int) -> str:
    """The sweep's run, with its config as params and ASHA's last rung (`search.asha.max_t`: the
    most steps a trial of the space takes)."""
    mlflow_client = tracking.client(sweep.tracking.uri)
    run_id = tracking.start_run(
        mlflow_client, experiment_id, sweep.name,
        {"qsweep.kind": "sweep", "qsweep.sweep": sweep.name, "qsweep.metric": sweep.search.metric,
         "qsweep.direction": sweep.search.direction},
    )
    tracking.log_batch(mlflow_client, run_id, params={**tracking.flatten(sweep.model_dump(mode="json")),
                                                      "search.asha.max_t": asha_max_t})
    mlflow_client.log_text(run_id, dump_yaml(sweep.model_dump(mode="json")), "sweep.yaml")
    mlflow_client.log_artifact(run_id, str(sweep_file))
    return run_id


def concurrency_limit(sweep: SweepConfig) -> int:
    """How many trials Optuna suggests ahead: one per CPU slot. Whether they run at once is Ray's
    call, from each trial's own memory request."""
    import ray

    if sweep.search.max_concurrent:
        return sweep.search.max_concurrent
    return max(1, int(ray.cluster_resources().get("CPU", 1) // sweep.resources.cpus_per_trial))


def _trainable(sweep: SweepConfig, trials_root: Path, machine: Machine,
               pending_baselines: dict[str, dict[str, Any]]) -> Any:
    from ray import tune

    from qsweep.train.models import resolve_model

    model_path = resolve_model(sweep.model.name, sweep.model.revision, sweep.base_dir).path
    return tune.with_resources(
        tune.with_parameters(
            train_trial, base=sweep.trial().model_dump(mode="json"), base_dir=str(sweep.base_dir),
            trials_root=str(trials_root), search=sweep.search.model_dump(mode="json"),
            threads=max(1, int(sweep.resources.cpus_per_trial)), pending_baselines=pending_baselines,
            machine=machine, calibration_factor=calibration(machine.device),
        ),
        resources_for(sweep, model_path, machine),
    )


def _new_tuner(sweep: SweepConfig, space: SearchSpace, folder: Path, machine: Machine, mirror: MlflowMirror,
               num_samples: int, pending_baselines: dict[str, dict[str, Any]], rows: int) -> Any:
    """`rows`: the training set's size, where a trial's steps depend on it (orchestrate.steps)."""
    from ray import tune

    return tune.Tuner(
        _trainable(sweep, folder / "trials", machine, pending_baselines),
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(sweep, space, concurrency_limit(sweep), folder),
            scheduler=build_scheduler(sweep, longest_trial_steps(sweep, space, rows)),
            num_samples=num_samples,
            reuse_actors=reuse_workers(sweep, space, machine),
        ),
        run_config=tune.RunConfig(
            name=RAY_DIR, storage_path=str(folder), verbose=0, callbacks=[mirror, LiveView(sweep, folder, machine, rows)],
            stop=AllFailingStopper(mirror.health),
            # Only a dead worker or node is a Ray error (see train_trial): retry it elsewhere.
            failure_config=tune.FailureConfig(max_failures=RETRIES_ON_LOST_WORKER),
        ),
    )


def reuse_workers(sweep: SweepConfig, space: SearchSpace, machine: Machine) -> bool:
    """Whether a finished trial's worker process runs the next trial that asks for the same resources:
    its start-up and imports (about 5 s of a core per trial) are then paid once per process. Each
    trial still measures its own peak (train.trial.PeakMemory resets it), sets its own cap and gives
    back its memory when it ends (train_trial), and a crash still ends one trial only.

    Not where a trial may have a CPU cap (limits.memory_mb on a CPU): RLIMIT_DATA counts the heap's
    size, which an earlier trial in the process has already grown, so a trial could use that heap's
    free room uncounted. A CUDA cap counts what torch holds, which each trial empties."""
    may_cap = sweep.limits.memory_mb is not None or "limits.memory_mb" in space.params
    return machine.device == "cuda" or not may_cap


def run_sweep(sweep: SweepConfig, sweep_file: Path, space: SearchSpace, address: str | None = None) -> SweepSummary:
    """Runs the sweep, or resumes it when its output folder already holds its state."""
    from ray import tune

    # Intermediate results carry only validation loss; the objective arrives with the final one.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Snapshot Ray's experiment state after every step, so a killed driver loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    folder = output_folder(sweep)
    state = check_folder(sweep, str(sweep_file))
    resuming = state is not None and tune.Tuner.can_restore(str(folder / RAY_DIR))
    rows = train_rows(sweep, space)
    try:
        with ray_started_beside(address) as ray_start:
            if state is None:
                experiment_id = tracking.ensure_experiment(sweep.tracking.uri, sweep.tracking.experiment)
                state = SweepState(fingerprint(sweep), experiment_id,
                                   start_parent_run(sweep, sweep_file, experiment_id,
                                                    longest_trial_steps(sweep, space, rows)), sweep.tracking.uri)
                write_state(folder, state)
            ray_start.ready()
            return _search(sweep, space, folder, state, resuming, ray_start.stop, rows)
    finally:
        logger.info("sweep %s done", sweep.name)


def _run_trials(sweep: SweepConfig, space: SearchSpace, folder: Path, state: SweepState, machine: Machine,
                resuming: bool, pending_baselines: dict[str, dict[str, Any]], rows: int) -> tuple[Any, Tried]:
    """Ray Tune's results, and the outcomes of trials run by an earlier driver Ray never saved."""
    from ray import tune

    if resuming:
        logger.info("resuming sweep %s from %s", sweep.name, folder)
        trainable = _trainable(sweep, folder / "trials", machine, pending_baselines)
        tuner = tune.Tuner.restore(str(folder / RAY_DIR), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        return tuner.fit(), Tried()
    earlier = prepare_study(sweep, folder, space)
    if earlier.total:
        logger.info("sweep %s: Ray saved no state; the study already holds %d trials", sweep.name, earlier.total)
    health = SweepHealth(give_up_after=min(GIVE_UP_AFTER_FAILURES, sweep.search.num_trials))
    mirror = MlflowMirror(sweep, state.experiment_id, state.parent_run_id, folder / "trials", health, rows)
    # No Ray trial exists yet, so every child run still RUNNING belongs to a driver that died.
    mirror.reconcile([])
    remaining = sweep.search.num_trials - earlier.total
    if remaining <= 0:
        return [], earlier
    return _new_tuner(sweep, space, folder, machine, mirror, remaining, pending_baselines, rows).fit(), earlier


def _search(sweep: SweepConfig, space: SearchSpace, folder: Path, state: SweepState, resuming: bool,
            stop_ray: Callable[[], None], rows: int) -> SweepSummary:
    """Baselines beside the trials, the trials, then deltas, the final stage, search insight and the
    report; `stop_ray` is called once Ray is no longer needed."""
    from qsweep.train.models import resolve_model

    with timed_phase("setup"):
        machine = cluster_machine()
        logger.info("trials are sized for %s with %.0f MiB", machine.device, machine.memory_mb)
        sharing.log_gpu_sharing(sweep.tracking.uri, state.parent_run_id, machine)
        resources = resources_for(sweep, resolve_model(sweep.model.name, sweep.model.revision, sweep.base_dir).path,
                                  machine)({})
        types = stages.quant_types(sweep, space)
        baseline_job = stages.start_baselines(sweep, types, state.parent_run_id)
        pending = stages.pending_baselines(sweep, baseline_job, folder / "baselines")
    with timed_phase("trials"):
        grid, earlier = _run_trials(sweep, space, folder, state, machine, resuming, pending, rows)
        sharing.record_cuda_contexts([r.metrics or {} for r in grid])
    with timed_phase("baselines"):
        baselines = stages.finish_baselines(sweep, baseline_job, state.parent_run_id,
                                            [r.metrics or {} for r in grid], resources, machine.context_mb)
    with timed_phase("deltas"):
        runs = tracking.trial_runs(tracking.client(sweep.tracking.uri), state.experiment_id, state.parent_run_id)
        stages.log_deltas(sweep.tracking.uri, runs, baselines)
    with timed_phase("final_stage"):
        final = final_stage.run_final_stage(sweep, runs, folder / "trials", resources, state.parent_run_id,
                                       machine.context_mb)
    # Nothing needs Ray from here on: it goes down (from this, the main thread) while the search
    # insight and the report are written, instead of after them.
    with ThreadPoolExecutor(1, thread_name_prefix="wrap-up") as pool:
        wrapping_up = pool.submit(wrap_up, sweep, state, folder, list(grid), baselines, final, earlier)
        stop_ray()
        return wrapping_up.result()


def wrap_up(sweep: SweepConfig, state: SweepState, folder: Path, results: list, baselines: dict[str, dict[str, float]],
            final: dict[str, Any], earlier: Tried) -> SweepSummary:
    """Search insight, the parent run's summary, and the report."""
    from qsweep.report import html as sweep_report

    with timed_phase("search_insight"):
        log_search_insight(sweep, state, folder)
    with timed_phase("finish"):
        summary = finish_parent_run(sweep, state, results, baselines.get(sweep.quantization.quant_type, {}), final,
                                    earlier)
    with timed_phase("report"):
        sweep_report.publish_at_end(sweep.tracking.uri, state.parent_run_id, folder)
    return summary


def log_search_insight(sweep: SweepConfig, state: SweepState, folder: Path) -> None:
    """Optuna's parameter importances and history, as PNGs and a JSON table on the parent run."""
    from qsweep.report import insight

    study = insight.load_study(folder, sweep.name)
    insight.log_search_insight(tracking.client(sweep.tracking.uri), state.parent_run_id, study,
                                folder / "search_insight", metric=sweep.search.metric)


def finish_parent_run(sweep: SweepConfig, state: SweepState, results: list, baseline: dict[str, float],
                      final: dict[str, Any], earlier: Tried) -> SweepSummary:
    """`results`: Ray Tune's, one per trial; `earlier`: the outcomes of trials a driver that died
    before Ray saved its state ran."""
    mlflow_client = tracking.client(sweep.tracking.uri)
    finished = [r for r in results if r.error is None and r.metrics and OBJECTIVE in r.metrics]
    failed = [r for r in results if r.error is not None or (r.metrics and FAILED in r.metrics)]
    stopped = len(results) - len(finished) - len(failed) + earlier.stopped
    n_finished, n_failed = len(finished) + earlier.finished, len(failed) + earlier.failed
    best = None
    if finished:
        pick = max if sweep.search.direction == "maximize" else min
        top = pick(finished, key=lambda r: r.metrics[OBJECTIVE])
        best = {"trial_id": top.metrics["trial_id"], "config": top.config, OBJECTIVE: top.metrics[OBJECTIVE]}
    gave_up = None
    if not n_finished and n_failed >= min(GIVE_UP_AFTER_FAILURES, sweep.search.num_trials):
        last = str(failed[-1].error or failed[-1].metrics.get(FAILED)).strip().splitlines()[-1] if failed else ""
        gave_up = f"the first {n_failed} trials all failed, so the sweep stopped; last error: {last}"
    summary_metrics = {"trials_finished": n_finished, "trials_stopped": stopped, "trials_failed": n_failed}
    if best:
        summary_metrics[f"best/{sweep.search.metric}"] = best[OBJECTIVE]
    tags = {}
    if final:
        summary_metrics["stages_agree"] = float(final["agree"])
        tags = {"qsweep.winner.cheap": final["cheap_winner"], "qsweep.winner.final": final["final_winner"]}
    tracking.log_batch(mlflow_client, state.parent_run_id, metrics=summary_metrics, tags=tags)
    tracking.end_run(mlflow_client, state.parent_run_id, "FINISHED" if n_finished else "FAILED",
                     gave_up or (None if n_finished else "no trial finished"))
    return SweepSummary(state.experiment_id, state.parent_run_id, n_finished, stopped, n_failed, baseline,
                        best, gave_up, final)
