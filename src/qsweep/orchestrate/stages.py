"""Scoring beside the search: the untuned baselines, and the Ray tasks that score like a trial.

During the search every trial is scored on a cheap, seeded subset (evaluation.limit). Baselines
give each trial a delta against the untuned base in its own quantization; the final stage after the
search (orchestrate.final) re-scores the best few.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from qsweep import tracking
from qsweep.config.policy import compute_dtype_name, scoring_dtype
from qsweep.config.schema import QuantizationConfig, SweepConfig, TrialConfig
from qsweep.evaluate import cache as evaluation_cache
from qsweep.resources.caps import cap_process, give_back_memory, release_cap
from qsweep.resources.estimate import CUDA_CONTEXT_MIB
from qsweep.search.space import SearchSpace

logger = logging.getLogger(__name__)

STDERR_SUFFIX = "_stderr"


@contextmanager
def capped(memory_mb: float | None, context_mb: float = CUDA_CONTEXT_MIB) -> Iterator[None]:
    """Caps a scoring task like the trial it scores (its Ray share less the context its request
    counted, or limits.memory_mb when smaller), then lifts the cap and gives the task's memory back:
    Ray reuses a CPU task's worker process for the next task. What the task loaded must be
    unreferenced by then (loaded and scored in a function that has returned): bitsandbytes' 4-bit
    weights point back at their layers, so only the collection here frees them."""
    cap_process(memory_mb, context_mb)
    try:
        yield
    finally:
        release_cap()
        give_back_memory()


def ray_options(resources: dict[str, float]) -> dict[str, Any]:
    """A trial's resource request as the options of a Ray task scoring the same model (for
    `ray.remote(**options)`, see scoring_task). A GPU task gets a fresh worker process (max_calls=1):
    an idle worker would keep its CUDA context and cache on the card outside any share, and a reused
    one stays on the card it first used."""
    gpus = resources.get("gpu", 0)
    return {"num_cpus": resources.get("cpu", 1), "num_gpus": gpus, "memory": resources.get("memory"),
            "max_calls": 1 if gpus else 0}


def scoring_task(function: Callable[..., Any], resources: dict[str, float]) -> Any:
    """`function` as a Ray task sized like a trial. The options go to `ray.remote` itself: given
    through `.options()`, `num_gpus` leaves max_calls unlimited (Ray sets 1 only in the decorator) and
    max_calls there is refused."""
    import ray

    return ray.remote(**ray_options(resources))(function)


def quant_types(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    """Every 4-bit type a trial of this sweep can use: the baseline is scored once for each."""
    types = [sweep.quantization.quant_type]
    spec = space.params.get("quantization.quant_type") if space else None
    if spec is not None and spec.choices:
        types += [str(c) for c in spec.choices if c not in types]
    return types


def score_baseline(trial_dict: dict[str, Any], base_dir: str, threads: int,
                   context_mb: float = CUDA_CONTEXT_MIB) -> dict[str, Any]:
    """The untuned base model, quantized like the trials, on the same items."""
    import time

    import torch

    from qsweep.train.trial import score_base

    started = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    trial = TrialConfig(**trial_dict)
    with capped(trial.limits.memory_mb, context_mb):
        result = score_base(trial, Path(base_dir))
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
    """The baselines of one sweep: those known at the start (logged before a resume, or in the
    evaluation cache) and those still to score, each under its cache key and ingredients."""

    scores: dict[str, dict[str, float]]
    pending: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)


def baseline_trial(sweep: SweepConfig, quant: str) -> TrialConfig:
    trial = sweep.trial().model_dump(mode="json")
    trial["quantization"]["quant_type"] = quant
    return TrialConfig(**trial)


def baseline_key(trial: TrialConfig, base_dir: Path) -> tuple[str, dict[str, Any]]:
    """The cache key (and its ingredients) of the untuned base as `trial` would load and score it."""
    from qsweep.evaluate.harness import include_dirs
    from qsweep.train.chat import template_in_effect
    from qsweep.train.models import resolve_model
    from qsweep.train.trial import device_type

    model = resolve_model(trial.model.name, trial.model.revision, base_dir)
    compute_dtype = trial.quantization.compute_dtype
    template = template_in_effect(model.path, trial, base_dir) if trial.evaluation.apply_chat_template else None
    ingredients = evaluation_cache.baseline_ingredients(
        model.content_hash, trial.quantization, compute_dtype_name(compute_dtype, device_type()), trial.evaluation,
        include_dirs(trial.evaluation.include_path, base_dir), scoring_dtype(compute_dtype, device_type()), template)
    return evaluation_cache.cache_key(ingredients), ingredients


def start_baselines(sweep: SweepConfig, types: list[str], parent_run_id: str) -> BaselineJob:
    """Takes each baseline from the parent run (a resume) or the evaluation cache; the rest are
    scored by the first trial of each type, on the base it loads anyway (see train.trial)."""
    job = BaselineJob(logged_baselines(sweep.tracking.uri, parent_run_id, types))
    tasks = ", ".join(sweep.evaluation.tasks)
    for quant in types:
        if quant in job.scores:
            continue
        key, ingredients = baseline_key(baseline_trial(sweep, quant), sweep.base_dir)
        job.keys[quant] = key
        entry = evaluation_cache.load(key)
        if entry is None:
            job.pending[quant] = key, ingredients
            continue
        job.scores[quant] = entry["scores"]
        job.cached.add(quant)
        logger.info("baseline %s %s: reused from the evaluation cache (key %s)", quant, tasks, key)
    return job


def pending_baselines(sweep: SweepConfig, job: BaselineJob, claims_dir: Path) -> dict[str, dict[str, Any]]:
    """What each trial is told: per 4-bit type, the key and quantization of the baseline still missing,
    and the file in `claims_dir` (the sweep's output folder, which every node sees) through which the
    first trial to ask claims its scoring (evaluate.claims)."""
    return {quant: {"key": key, "quantization": baseline_trial(sweep, quant).quantization.model_dump(mode="json"),
                    "claim": str(claims_dir / f"{key}.claim")}
            for quant, (key, _) in job.pending.items()}


def untuned_base_for(trial: TrialConfig, pending: dict[str, dict[str, Any]], base_dir: Path) -> Any:
    """The baseline a trial scores before it trains (train.trial.score_untuned_base): the one for its
    4-bit type, if still missing and asked the same question as the sweep (its evaluation settings
    are not searched away); None otherwise."""
    from qsweep.train.trial import UntunedBase

    wanted = pending.get(trial.quantization.quant_type)
    if wanted is None:
        return None
    config = trial.model_copy(update={"quantization": QuantizationConfig(**wanted["quantization"])})
    key, ingredients = baseline_key(config, base_dir)
    return UntunedBase(config, key, ingredients, Path(wanted["claim"])) if key == wanted["key"] else None


def finish_baselines(sweep: SweepConfig, job: BaselineJob, parent_run_id: str, trial_results: list[dict],
                     resources: dict[str, float], context_mb: float = CUDA_CONTEXT_MIB
                     ) -> dict[str, dict[str, float]]:
    """Collects the baselines the trials scored, scores any no trial could (its 4-bit type never
    ran with the sweep's settings, or the trial that claimed it failed elsewhere) in Ray tasks,
    caches them, and logs them all to the parent run."""
    import ray

    scored = {b["key"]: b for r in trial_results if isinstance(b := r.get("baseline"), dict)}
    missing = {quant: entry for quant, entry in job.pending.items()
               if entry[0] not in scored and evaluation_cache.load(entry[0]) is None}
    remote = scoring_task(score_baseline, resources)
    refs = {quant: remote.remote(baseline_trial(sweep, quant).model_dump(mode="json"), str(sweep.base_dir),
                                 max(1, int(resources.get("cpu", 1))), context_mb) for quant in missing}
    seconds = {}
    for quant, (key, ingredients) in job.pending.items():
        outcome = ray.get(refs[quant]) if quant in refs else scored.get(key)
        if outcome is None:  # scored by a trial on this machine, which wrote it to the cache
            job.scores[quant] = evaluation_cache.load(key)["scores"]
            continue
        job.scores[quant], seconds[quant] = outcome["scores"], outcome["seconds"]
        if quant in refs:  # a trial that scored a baseline cached it itself (train.trial.score_untuned_base)
            evaluation_cache.store(key, ingredients, outcome["scores"], outcome["items"])
        logger.info("baseline %s scored in %.1f s (%s) and cached under key %s", quant, outcome["seconds"],
                    "in a separate task" if quant in refs else "by a trial", key)
    log_baselines(sweep.tracking.uri, parent_run_id, job.scores, sweep.quantization.quant_type)
    tags = {f"qsweep.baseline_cache.{quant}": f"{'reused' if quant in job.cached else 'stored'} {key}"
            for quant, key in job.keys.items()}
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
