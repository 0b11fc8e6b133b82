"""Scoring around the search: the untuned baselines beside it, the final stage after it.

During the search every trial is scored on a cheap, seeded subset (evaluation.limit). Baselines
give each trial a delta against the untuned base in its own quantization, and the final stage
re-scores the best few on more items, packed on the cluster like training, because a winner picked
on a small subset can be noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qsweep import tracking
from qsweep.config.schema import SweepConfig, TrialConfig
from qsweep.evaluate import cache as evaluation_cache
from qsweep.search.objective import objective_value
from qsweep.search.space import SearchSpace

logger = logging.getLogger(__name__)

STDERR_SUFFIX = "_stderr"


def ray_options(resources: dict[str, float]) -> dict[str, Any]:
    """A trial's resource request as options of a Ray task scoring the same model."""
    return {"num_cpus": resources.get("cpu", 1), "num_gpus": resources.get("gpu", 0),
            "memory": resources.get("memory")}


def quant_types(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    """Every 4-bit type a trial of this sweep can use: the baseline is scored once for each."""
    types = [sweep.quantization.quant_type]
    spec = space.params.get("quantization.quant_type") if space else None
    if spec is not None and spec.choices:
        types += [str(c) for c in spec.choices if c not in types]
    return types


def score_baseline(trial_dict: dict[str, Any], base_dir: str, threads: int) -> dict[str, Any]:
    """The untuned base model, quantized like the trials, on the same items."""
    import time

    import torch

    from qsweep.evaluate.harness import score
    from qsweep.train.models import resolve_model
    from qsweep.train.trial import load_base

    started = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    trial = TrialConfig(**trial_dict)
    model_info = resolve_model(trial.model.name, trial.model.revision, Path(base_dir))
    model, tokenizer = load_base(model_info.path, trial.quantization, trial.model.trust_remote_code)
    result = score(model, tokenizer, trial.evaluation, Path(base_dir))
    return {"scores": result.scores, "items": result.items, "seconds": time.perf_counter() - started}


def logged_baselines(uri: str, parent_run_id: str, types: list[str]) -> dict[str, dict[str, float]]:
    metrics = tracking.client(uri).get_run(parent_run_id).data.metrics
    found: dict[str, dict[str, float]] = {}
    for quant in types:
        prefix = f"baseline/{quant}/"
        scores = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        if scores:
            found[quant] = scores
    return found


@dataclass
class BaselineJob:
    """The baselines of one sweep: known ones (logged before a resume, or cached) and Ray tasks
    scoring the rest beside the trials."""

    scores: dict[str, dict[str, float]]
    keys: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    refs: dict[str, Any] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)


def baseline_trial(sweep: SweepConfig, quant: str) -> TrialConfig:
    trial = sweep.trial().model_dump(mode="json")
    trial["quantization"]["quant_type"] = quant
    return TrialConfig(**trial)


def baseline_key(sweep: SweepConfig, quant: str) -> tuple[str, dict[str, Any]]:
    from qsweep.evaluate.harness import include_dirs
    from qsweep.train.models import resolve_model
    from qsweep.train.trial import resolve_compute_dtype

    trial = baseline_trial(sweep, quant)
    model_hash = resolve_model(trial.model.name, trial.model.revision, sweep.base_dir).content_hash
    dtype = str(resolve_compute_dtype(trial.quantization.compute_dtype)).removeprefix("torch.")
    ingredients = evaluation_cache.baseline_ingredients(
        model_hash, trial.quantization, dtype, trial.evaluation,
        include_dirs(trial.evaluation.include_path, sweep.base_dir))
    return evaluation_cache.cache_key(ingredients), ingredients


def start_baselines(sweep: SweepConfig, types: list[str], parent_run_id: str,
                    resources: dict[str, float]) -> BaselineJob:
    """Takes each baseline from the parent run (a resume) or the evaluation cache, and starts Ray
    tasks scoring the others beside the trials."""
    import ray

    job = BaselineJob(logged_baselines(sweep.tracking.uri, parent_run_id, types))
    remote = ray.remote(score_baseline).options(**ray_options(resources))
    tasks = ", ".join(sweep.evaluation.tasks)
    for quant in types:
        if quant in job.scores:
            continue
        key, ingredients = baseline_key(sweep, quant)
        job.keys[quant] = key, ingredients
        entry = evaluation_cache.load(key)
        if entry is not None:
            job.scores[quant] = entry["scores"]
            job.cached.add(quant)
            logger.info("baseline %s %s: reused from the evaluation cache (key %s)", quant, tasks, key)
            continue
        job.refs[quant] = remote.remote(baseline_trial(sweep, quant).model_dump(mode="json"), str(sweep.base_dir),
                                        max(1, int(resources.get("cpu", 1))))
    return job


def finish_baselines(sweep: SweepConfig, job: BaselineJob, parent_run_id: str) -> dict[str, dict[str, float]]:
    """Waits for the scoring tasks, caches what they scored, and logs every baseline to the parent run."""
    import ray

    seconds = {}
    for quant, ref in job.refs.items():
        outcome = ray.get(ref)
        job.scores[quant], seconds[quant] = outcome["scores"], outcome["seconds"]
        key, ingredients = job.keys[quant]
        path = evaluation_cache.store(key, ingredients, outcome["scores"], outcome["items"])
        logger.info("baseline %s scored in %.1f s, stored in the evaluation cache: %s", quant, outcome["seconds"], path)
    log_baselines(sweep.tracking.uri, parent_run_id, job.scores, sweep.quantization.quant_type)
    tags = {f"qsweep.baseline_cache.{quant}": f"{'reused' if quant in job.cached else 'stored'} {key}"
            for quant, (key, _) in job.keys.items()}
    tracking.log_batch(tracking.client(sweep.tracking.uri), parent_run_id,
                       metrics={f"baseline_seconds/{quant}": value for quant, value in seconds.items()}, tags=tags)
    return job.scores


def log_baselines(uri: str, parent_run_id: str, baselines: dict[str, dict[str, float]], base_quant: str) -> None:
    metrics = {f"baseline/{quant}/{k}": v for quant, scores in baselines.items() for k, v in scores.items()}
    # The sweep's own quantization also goes under plain `baseline/`: that is what the leaderboard shows.
    metrics.update({f"baseline/{k}": v for k, v in baselines.get(base_quant, {}).items()})
    tracking.log_batch(tracking.client(uri), parent_run_id, metrics=metrics)


def deltas(scores: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    return {f"delta/{k}": v - baseline[k] for k, v in scores.items()
            if k in baseline and not k.endswith(STDERR_SUFFIX)}


def log_deltas(uri: str, runs: dict[str, Any], baselines: dict[str, dict[str, float]]) -> None:
    """Each finished trial's score minus the untuned base's in the same quantization."""
    mlflow_client = tracking.client(uri)
    for run in runs.values():
        if run.data.tags.get("qsweep.outcome") != "finished":
            continue
        baseline = baselines.get(run.data.params.get("quantization.quant_type", ""), {})
        scores = {k: v for k, v in run.data.metrics.items() if "/" in k and not k.startswith(("delta/", "final/"))}
        if values := deltas(scores, baseline):
            tracking.log_batch(mlflow_client, run.info.run_id, metrics=values)


def score_final(trial_dir: str, limit: int | None, threads: int) -> dict[str, Any]:
    """Reloads a trial's adapter exactly as logged and scores it on the final stage's items."""
    import torch

    from qsweep.evaluate.harness import score
    from qsweep.report.replay import load_trained

    torch.set_num_threads(max(1, threads))
    folder = Path(trial_dir)
    logged = yaml.safe_load((folder / "config.yaml").read_text())
    provenance = logged.pop("provenance")
    trial = TrialConfig(**logged)
    base_dir = Path(provenance["base_dir"])
    model, tokenizer = load_trained(trial, folder / "adapter", base_dir)
    result = score(model, tokenizer, trial.evaluation, base_dir, limit=limit)
    return {"scores": result.scores, "items": result.items}


def run_final_stage(sweep: SweepConfig, runs: dict[str, Any], trials_root: Path,
                    resources: dict[str, float]) -> dict[str, Any]:
    """Re-scores the top_k finished trials (by their cheap score) in parallel Ray tasks."""
    import ray

    final = sweep.evaluation.final
    metric = sweep.search.metric
    finished = [r for r in runs.values() if r.data.tags.get("qsweep.outcome") == "finished" and metric in r.data.metrics]
    if final is None or not finished:
        return {}
    reverse = sweep.search.direction == "maximize"
    top = sorted(finished, key=lambda r: r.data.metrics[metric], reverse=reverse)[:final.top_k]
    remote = ray.remote(score_final).options(**ray_options(resources))
    refs = {run.info.run_id: remote.remote(str(trials_root / run.data.tags["qsweep.trial_id"]), final.limit,
                                           max(1, int(resources.get("cpu", 1))))
            for run in top}
    mlflow_client = tracking.client(sweep.tracking.uri)
    results = {}
    for run_id, ref in refs.items():
        outcome = ray.get(ref)
        scores = outcome["scores"]
        if sweep.search.weights:
            scores = {**scores, "objective": objective_value(scores, sweep.search)}
        results[run_id] = scores
        tracking.log_batch(mlflow_client, run_id, metrics={f"final/{k}": v for k, v in scores.items()})
        tracking.log_dict(mlflow_client, run_id, {"items": outcome["items"]}, "final_items.json")
    cheap_winner = top[0].info.run_id
    pick = max if reverse else min
    final_winner = pick(results, key=lambda run_id: results[run_id][metric])
    return {"cheap_winner": cheap_winner, "final_winner": final_winner, "agree": cheap_winner == final_winner}
