"""Orchestration: Ray Tune runs the trials, Optuna suggests them, ASHA stops the losers.

The driver owns MLflow (see tracking.py): a Tune callback turns each trial's start, progress,
completion or error into its child run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsweep import tracking
from qsweep.config import SweepConfig, TrialConfig, dump_yaml
from qsweep.resources import trial_resources
from qsweep.space import DefineByRun, SearchSpace, apply_params

logger = logging.getLogger(__name__)

OBJECTIVE = "objective"


@dataclass
class SweepSummary:
    experiment_id: str
    parent_run_id: str
    finished: int
    stopped: int
    failed: int
    baseline: dict[str, float]
    best: dict[str, Any] | None


def objective_sign(direction: str) -> str:
    return "max" if direction == "maximize" else "min"


def train_trial(params: dict[str, Any], base: dict[str, Any], base_dir: str, trials_root: str,
                metric: str, threads: int) -> None:
    """The Ray Tune trainable: one trial in a Ray worker process."""
    import torch
    from ray import tune

    from qsweep.trial import run_trial

    torch.set_num_threads(max(1, threads))
    trial = apply_params(TrialConfig(**base), params)
    out_dir = Path(trials_root) / tune.get_context().get_trial_id()
    outcome = run_trial(trial, Path(base_dir), out_dir, report=tune.report)
    if metric not in outcome.scores:
        raise KeyError(f"search.metric {metric!r} is not among the scores: {sorted(outcome.scores)}")
    last_eval = [p["eval_loss"] for p in outcome.curve if "eval_loss" in p]
    tune.report({
        "step": trial.training.max_steps,
        "eval_loss": last_eval[-1] if last_eval else float("nan"),
        OBJECTIVE: outcome.scores[metric],
        "scores": outcome.scores,
        "measures": outcome.metrics,
        "provenance": outcome.provenance,
        "out_dir": str(out_dir),
    })


def score_baseline(trial_dict: dict[str, Any], base_dir: str, threads: int) -> dict[str, float]:
    """The untuned base model, quantized like the trials, on the same tasks."""
    import torch

    from qsweep.evaluate import evaluate_model, include_dirs
    from qsweep.models import resolve_model
    from qsweep.trial import load_base

    torch.set_num_threads(max(1, threads))
    trial = TrialConfig(**trial_dict)
    model_info = resolve_model(trial.model.name, trial.model.revision, Path(base_dir))
    model, tokenizer = load_base(model_info.path, trial.quantization, trial.model.trust_remote_code)
    evaluation = trial.evaluation
    return evaluate_model(
        model, tokenizer, evaluation.tasks, include_dirs(evaluation.include_path, Path(base_dir)),
        num_fewshot=evaluation.num_fewshot, limit=evaluation.limit, batch_size=evaluation.batch_size,
    ).scores


def _final_metric_searcher() -> type:
    from ray.tune.search.optuna import OptunaSearch

    class FinalScoreOptunaSearch(OptunaSearch):
        """Optuna only ever sees the final lm-eval score.

        Intermediate results carry validation loss for ASHA; Ray's OptunaSearch would index the
        objective in every result. A trial ASHA stops has no score and is told to Optuna as pruned.
        """

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    return FinalScoreOptunaSearch


def build_searcher(sweep: SweepConfig, space: SearchSpace, concurrency: int) -> Any:
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    searcher = _final_metric_searcher()(
        space=DefineByRun(space),
        metric=OBJECTIVE,
        mode=objective_sign(sweep.search.direction),
        points_to_evaluate=sweep.search.baselines or None,
        sampler=optuna.samplers.TPESampler(seed=sweep.search.sampler_seed, n_startup_trials=4),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)


def build_scheduler(sweep: SweepConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = sweep.search.asha
    if not asha.enabled:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        metric="eval_loss",
        mode="min",
        max_t=sweep.training.max_steps,
        grace_period=asha.grace_steps,
        reduction_factor=asha.reduction_factor,
    )


def _mlflow_callback(sweep: SweepConfig, experiment_id: str, parent_run_id: str) -> Any:
    from ray.tune import Callback

    base = sweep.trial()
    metric = sweep.search.metric

    class MlflowTrials(Callback):
        """Mirrors each Tune trial into a child MLflow run, written from the driver only."""

        def __init__(self) -> None:
            self.client = tracking.client(sweep.tracking.uri)
            self.runs: dict[str, str] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            resolved = apply_params(base, trial.config).model_dump(mode="json")
            run_id = tracking.start_run(
                self.client, experiment_id, f"{sweep.name}-{trial.trial_id}",
                {"mlflow.parentRunId": parent_run_id, "qsweep.kind": "trial", "qsweep.sweep": sweep.name,
                 "qsweep.trial_id": trial.trial_id, "qsweep.metric": metric},
            )
            self.runs[trial.trial_id] = run_id
            tracking.log_batch(self.client, run_id, params={**tracking.flatten(resolved),
                                                            **{f"search.{k}": v for k, v in trial.config.items()}})
            tracking.log_dict(self.client, run_id, resolved, "config.json")
            logger.info("trial %s started: %s", trial.trial_id, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run_id = self.runs[trial.trial_id]
            if OBJECTIVE in result:
                self._log_final(run_id, result)
            else:
                tracking.log_batch(self.client, run_id, metrics={"eval_loss": result["eval_loss"]},
                                   step=int(result["step"]))

        def _log_final(self, run_id: str, result: dict) -> None:
            out_dir = Path(result["out_dir"])
            provenance = result["provenance"]
            tracking.log_batch(
                self.client, run_id,
                params={f"provenance.{k}": v for k, v in tracking.flatten(provenance).items()},
                metrics={**result["scores"], **result["measures"], "eval_loss": result["eval_loss"]},
                step=int(result["step"]),
            )
            tracking.log_files(
                self.client, run_id,
                files=[out_dir / "config.yaml", out_dir / "lm_eval_results.json", out_dir / "lm_eval_samples.jsonl"],
                folders={"adapter": out_dir / "adapter"},
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            run_id = self.runs[trial.trial_id]
            if OBJECTIVE in trial.last_result:
                self.client.set_tag(run_id, "qsweep.outcome", "finished")
                tracking.end_run(self.client, run_id, "FINISHED")
                logger.info("trial %s finished: %s = %.4f", trial.trial_id, metric, trial.last_result[OBJECTIVE])
            else:
                self.client.set_tag(run_id, "qsweep.outcome", "stopped")
                step = trial.last_result.get("step")
                tracking.end_run(self.client, run_id, "KILLED", f"stopped early by ASHA at step {step}")
                logger.info("trial %s stopped early by ASHA at step %s", trial.trial_id, step)

        def on_trial_error(self, iteration, trials, trial, **info):
            run_id = self.runs.get(trial.trial_id)
            if run_id is None:
                return
            error = trial.get_error()
            reason = str(error) if error else "the trial process failed"
            self.client.set_tag(run_id, "qsweep.outcome", "failed")
            tracking.end_run(self.client, run_id, "FAILED", reason)
            logger.warning("trial %s failed: %s", trial.trial_id, reason.strip().splitlines()[-1])

    return MlflowTrials()


def start_parent_run(sweep: SweepConfig, sweep_file: Path, experiment_id: str) -> str:
    mlflow_client = tracking.client(sweep.tracking.uri)
    run_id = tracking.start_run(
        mlflow_client, experiment_id, sweep.name,
        {"qsweep.kind": "sweep", "qsweep.sweep": sweep.name, "qsweep.metric": sweep.search.metric,
         "qsweep.direction": sweep.search.direction},
    )
    tracking.log_batch(mlflow_client, run_id, params=tracking.flatten(sweep.model_dump(mode="json")))
    mlflow_client.log_text(run_id, dump_yaml(sweep.model_dump(mode="json")), "sweep.yaml")
    mlflow_client.log_artifact(run_id, str(sweep_file))
    return run_id


def run_sweep(sweep: SweepConfig, sweep_file: Path, space: SearchSpace, address: str | None = None) -> SweepSummary:
    import ray
    from ray import tune

    # Intermediate results carry only validation loss; the objective arrives with the final one.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    experiment_id = tracking.ensure_experiment(sweep.tracking.uri, sweep.tracking.experiment)
    parent_run_id = start_parent_run(sweep, sweep_file, experiment_id)
    storage = (Path(sweep.resolve_path(sweep.output_dir)) / sweep.name).resolve()
    trials_root = storage / "trials"
    trials_root.mkdir(parents=True, exist_ok=True)

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}})
    resources = trial_resources(sweep)
    base = sweep.trial().model_dump(mode="json")
    threads = max(1, int(resources.get("cpu", 1)))
    baseline_ref = ray.remote(score_baseline).options(num_cpus=resources.get("cpu", 1),
                                                       num_gpus=resources.get("gpu", 0)).remote(
        base, str(sweep.base_dir), threads)

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=base, base_dir=str(sweep.base_dir), trials_root=str(trials_root),
                             metric=sweep.search.metric, threads=threads),
        resources,
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(sweep, space, concurrency_limit(sweep, resources)),
            scheduler=build_scheduler(sweep),
            num_samples=sweep.search.num_trials,
        ),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(storage.parent / ".ray"), verbose=0,
            callbacks=[_mlflow_callback(sweep, experiment_id, parent_run_id)],
        ),
    )
    grid = tuner.fit()
    baseline = ray.get(baseline_ref)
    return finish_parent_run(sweep, experiment_id, parent_run_id, grid, baseline)


def concurrency_limit(sweep: SweepConfig, resources: dict[str, float]) -> int:
    import ray

    if sweep.search.max_concurrent:
        return sweep.search.max_concurrent
    cluster = ray.cluster_resources()
    slots = [cluster.get("CPU", 1) // resources.get("cpu", 1)]
    if resources.get("gpu"):
        slots.append(cluster.get("GPU", 0) // resources["gpu"])
    return max(1, int(min(slots)))


def finish_parent_run(sweep: SweepConfig, experiment_id: str, parent_run_id: str, grid: Any,
                      baseline: dict[str, float]) -> SweepSummary:
    mlflow_client = tracking.client(sweep.tracking.uri)
    results = [r for r in grid]
    finished = [r for r in results if r.error is None and r.metrics and OBJECTIVE in r.metrics]
    failed = [r for r in results if r.error is not None]
    stopped = len(results) - len(finished) - len(failed)
    best = None
    if finished:
        pick = max if sweep.search.direction == "maximize" else min
        top = pick(finished, key=lambda r: r.metrics[OBJECTIVE])
        best = {"trial_id": top.metrics["trial_id"], "config": top.config, OBJECTIVE: top.metrics[OBJECTIVE]}
    summary_metrics = {f"baseline/{k}": v for k, v in baseline.items()}
    summary_metrics.update({"trials_finished": len(finished), "trials_stopped": stopped, "trials_failed": len(failed)})
    if best:
        summary_metrics[f"best/{sweep.search.metric}"] = best[OBJECTIVE]
    tracking.log_batch(mlflow_client, parent_run_id, metrics=summary_metrics)
    tracking.end_run(mlflow_client, parent_run_id, "FINISHED" if finished else "FAILED",
                     None if finished else "no trial finished")
    return SweepSummary(experiment_id, parent_run_id, len(finished), stopped, len(failed), baseline, best)
