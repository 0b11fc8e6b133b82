"""The final stage, after the search: the best few trials re-scored on more items, because a winner
picked on a small seeded subset can be noise, and on the tasks too costly for every trial
(evaluation.final.tasks, e.g. an MMLU guard), beside the untuned base's score on them. The
finalists of one quantization share one loaded base, in one Ray task capped like a trial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsweep import tracking
from qsweep.config.schema import QuantizationConfig, SweepConfig, TrialConfig
from qsweep.evaluate import cache as evaluation_cache
from qsweep.orchestrate.stages import baseline_key, baseline_trial, capped, deltas, log_baselines, scoring_task
from qsweep.resources.estimate import CUDA_CONTEXT_MIB
from qsweep.search.objective import objective_value

logger = logging.getLogger(__name__)


def final_baseline_trial(sweep: SweepConfig, quant: str) -> TrialConfig:
    """The untuned base as the final stage scores it: on the final stage's own tasks
    (evaluation.final.tasks) and items, the ones no trial was scored on during the search."""
    trial = baseline_trial(sweep, quant)
    final = sweep.evaluation.final
    evaluation = trial.evaluation.model_copy(update={"tasks": final.tasks, "limit": final.limit,
                                                     "per_subject": final.per_subject, "final": None})
    return trial.model_copy(update={"evaluation": evaluation})


def score_final(trial_dirs: list[str], stage: dict[str, Any], untuned_base: dict[str, Any] | None, threads: int,
                log_file: str, context_mb: float = CUDA_CONTEXT_MIB) -> dict[str, Any]:
    """Re-scores finalists that share a base and its quantization on that base, loaded once: each
    logged adapter in turn (report.replay.load_trained_on_one_base), on the final stage's items and
    tasks. `untuned_base` (config, key, ingredients), when given, is scored first on the final
    stage's own tasks (train.trial.score_untuned_base: cached, skipped if already cached): on the
    loaded base when it is quantized the same way, else on its own base, loaded and dropped before."""
    import torch

    from qsweep.config.schema import FinalStageConfig
    from qsweep.orchestrate.task_log import trial_log
    from qsweep.train.provenance import CONFIG_FILE, read_trial_config
    from qsweep.train.trial import UntunedBase

    torch.set_num_threads(max(1, threads))
    logged = {f"trial_{i}": (folder, *read_trial_config(Path(folder) / CONFIG_FILE)) for i, folder in enumerate(trial_dirs)}
    _, first, provenance = logged["trial_0"]
    base_dir = Path(provenance["base_dir"])
    untuned = untuned_base and UntunedBase(TrialConfig(**untuned_base["config"]), untuned_base["key"],
                                           untuned_base["ingredients"])
    with trial_log(Path(log_file)), capped(first.limits.memory_mb, context_mb):
        return _score_group(logged, base_dir, untuned, FinalStageConfig(**stage))


def _score_group(logged: dict[str, tuple[str, TrialConfig, dict]], base_dir: Path, untuned: Any, stage: Any
                 ) -> dict[str, Any]:
    """score_final's work, in a function of its own so that the models it loads are unreferenced
    once it returns and `capped` can free them (bitsandbytes' 4-bit weights sit in reference cycles)."""
    import time

    from qsweep.evaluate.harness import score
    from qsweep.report.replay import load_trained_on_one_base
    from qsweep.train.trial import score_untuned_base

    first = logged["trial_0"][1]
    same_base = untuned is not None and untuned.config.quantization == first.quantization
    scores, baseline = {}, None
    if untuned and not same_base:
        baseline = score_untuned_base(untuned, base_dir)
    (model, tokenizer), adapters = load_trained_on_one_base(
        {name: (trial, Path(folder) / "adapter") for name, (folder, trial, _) in logged.items()}, base_dir)
    if same_base:
        baseline = score_untuned_base(untuned, base_dir, model, tokenizer)
    if baseline is not None:
        logger.info("final stage: the untuned base scored on %s in %.1f s", ", ".join(untuned.config.evaluation.tasks),
                    baseline["seconds"])
    for name, model in adapters:
        folder, trial, _ = logged[name]
        started = time.perf_counter()
        result = score(model, tokenizer, trial.evaluation, base_dir, trial.quantization, stage=stage)
        scores[folder] = {"scores": result.scores, "items": result.items, "dtype": result.dtype,
                          "seconds": time.perf_counter() - started}
        logger.info("final stage: %s scored on the shared base", Path(folder).name)
    return {"scores": scores, "baseline": baseline}


def finalists(sweep: SweepConfig, runs: dict[str, Any]) -> list[Any]:
    """The top_k finished trials by their cheap score."""
    metric = sweep.search.metric
    finished = [r for r in runs.values() if r.data.tags.get("qsweep.outcome") == "finished" and metric in r.data.metrics]
    return sorted(finished, key=lambda r: r.data.metrics[metric],
                  reverse=sweep.search.direction == "maximize")[:sweep.evaluation.final.top_k]


@dataclass
class FinalGroup:
    """Finalists whose base loads the same way (model and quantization), scored on one load, and the
    untuned base the same task scores first, if any."""

    quantization: QuantizationConfig
    runs: list[Any]
    untuned: dict[str, Any] | None = None


def by_base(top: list[Any], trials_root: Path) -> list[FinalGroup]:
    from qsweep.train.provenance import CONFIG_FILE, read_trial_config

    groups: dict[str, FinalGroup] = {}
    for run in top:
        trial, _ = read_trial_config(trials_root / run.data.tags["qsweep.trial_id"] / CONFIG_FILE)
        key = f"{trial.model.model_dump_json()} {trial.quantization.model_dump_json()}"
        groups.setdefault(key, FinalGroup(trial.quantization, [])).runs.append(run)
    return list(groups.values())


def final_baselines(sweep: SweepConfig, groups: list[FinalGroup]) -> dict[str, dict[str, float]]:
    """The untuned base on the final stage's own tasks, per 4-bit type of the finalists: from the
    evaluation cache, or else handed to a group of that type to score first (on its own base when one
    is quantized exactly like it)."""
    known: dict[str, dict[str, float]] = {}
    for quant in sorted({g.quantization.quant_type for g in groups} if sweep.evaluation.final.tasks else []):
        trial = final_baseline_trial(sweep, quant)
        key, ingredients = baseline_key(trial, sweep.base_dir)
        if (entry := evaluation_cache.load(key)) is not None:
            known[quant] = entry["scores"]
            logger.info("final-stage baseline %s %s: reused from the evaluation cache (key %s)", quant,
                        ", ".join(trial.evaluation.tasks), key)
            continue
        same_type = [g for g in groups if g.quantization.quant_type == quant]
        exact = [g for g in same_type if g.quantization == trial.quantization]
        (exact or same_type)[0].untuned = {"config": trial.model_dump(mode="json"), "key": key,
                                           "ingredients": ingredients}
    return known


def final_cpus(resources: dict[str, float], groups: int) -> float:
    """A group scores its finalists one after another: with fewer groups than a node has cores, each
    takes a share of the largest node's cores rather than a trial's one."""
    import ray

    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=1)
    return max(resources.get("cpu", 1), float(int(largest // groups)))


def run_final_stage(sweep: SweepConfig, runs: dict[str, Any], trials_root: Path, resources: dict[str, float],
                    parent_run_id: str, context_mb: float = CUDA_CONTEXT_MIB) -> dict[str, Any]:
    """Re-scores the top_k finished trials (by their cheap score) on the final stage's items and
    tasks: one Ray task per base (model and quantization), in parallel, each loading its base once for
    all its finalists (score_final), and the untuned base on the final stage's own tasks once per
    4-bit type, cached. Logs `final/...` and, against that base, `delta/final/...` on each finalist."""
    import ray

    final = sweep.evaluation.final
    top = finalists(sweep, runs) if final is not None else []
    if not top:
        return {}
    groups = by_base(top, trials_root)
    baselines = final_baselines(sweep, groups)
    cpus = final_cpus(resources, len(groups))
    remote = scoring_task(score_final, {**resources, "cpu": cpus})
    folder = {run.info.run_id: str(trials_root / run.data.tags["qsweep.trial_id"]) for run in top}
    refs = [remote.remote([folder[r.info.run_id] for r in group.runs], final.model_dump(), group.untuned, int(cpus),
                          str(trials_root.parent / f"final_stage_{i}.log"), context_mb)
            for i, group in enumerate(groups)]
    mlflow_client = tracking.client(sweep.tracking.uri)
    results = {}
    for group, ref in zip(groups, refs):
        outcome = ray.get(ref)
        quant = group.quantization.quant_type
        if group.untuned is not None:  # None in the outcome: another sweep cached it meanwhile
            scored = outcome["baseline"] or evaluation_cache.load(group.untuned["key"])
            baselines[quant] = scored["scores"]
        logger.info("final stage: %d finalist(s) of %s re-scored on one base load", len(group.runs), quant)
        for run in group.runs:
            scored = outcome["scores"][folder[run.info.run_id]]
            scores = scored["scores"]
            if sweep.search.weights:
                scores = {**scores, "objective": objective_value(scores, sweep.search)}
            results[run.info.run_id] = scores
            metrics = {f"final/{k}": v for k, v in scores.items()}
            base = {f"final/{k}": v for k, v in baselines.get(quant, {}).items()}
            tracking.log_batch(mlflow_client, run.info.run_id, metrics={**metrics, **deltas(metrics, base),
                                                                        "final_eval_seconds": scored["seconds"]})
            tracking.log_dict(mlflow_client, run.info.run_id, {"items": scored["items"], "dtype": scored["dtype"]},
                              "final_items.json")
    log_final_baselines(sweep, parent_run_id, baselines)
    cheap_winner = top[0].info.run_id
    pick = max if sweep.search.direction == "maximize" else min
    final_winner = pick(results, key=lambda run_id: results[run_id][sweep.search.metric])
    return {"cheap_winner": cheap_winner, "final_winner": final_winner, "agree": cheap_winner == final_winner,
            "baselines": baselines}


def log_final_baselines(sweep: SweepConfig, parent_run_id: str, baselines: dict[str, dict[str, float]]) -> None:
    """`baseline/final/...` beside the search's `baseline/...`, per 4-bit type and plainly for the sweep's own."""
    prefixed = {quant: {f"final/{k}": v for k, v in scores.items()} for quant, scores in baselines.items()}
    if prefixed:
        log_baselines(sweep.tracking.uri, parent_run_id, prefixed, sweep.quantization.quant_type)
