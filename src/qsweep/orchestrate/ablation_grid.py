"""Ablation studies: a fixed base config, factors with listed values, N seeds per cell.

An ablation is a sweep whose search space holds only the factors and the seed and whose trials
are the full grid, enqueued in order; so it runs through the same orchestrator (packed, resumable,
tracked) and only the report (qsweep.report.ablation, ablation_report) is its own.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import Field

from qsweep.config.schema import (
    SEED_PARAM,
    ClusterConfig,
    ResourcesConfig,
    Strict,
    SweepConfig,
    TrackingConfig,
    TrialConfig,
    load_config,
)
from qsweep.search.space import ParamSpec, Scalar, SearchSpace


class AblationSpec(Strict):
    factors: dict[str, list[Scalar]] = Field(min_length=1, description="dotted trial field: the values to compare")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    reference: dict[str, Scalar] = Field(default_factory=dict, description="defaults to each factor's first value")
    metric: str = "zorble/acc"
    max_concurrent: int | None = Field(None, ge=1)


class AblationConfig(TrialConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    ablation: AblationSpec
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    output_dir: str = "runs"
    base_dir: Path = Field(default=Path("."), exclude=True)


def load_ablation(path: Path) -> AblationConfig:
    return load_config(path, AblationConfig)


def ablation_space(spec: AblationSpec) -> SearchSpace:
    params = {factor: ParamSpec(choices=values) for factor, values in spec.factors.items()}
    params[SEED_PARAM] = ParamSpec(choices=list(spec.seeds))
    return SearchSpace(description="ablation grid", params=params)


def grid(spec: AblationSpec) -> list[dict[str, Any]]:
    """Every cell × seed, seeds innermost so each cell's seeds run side by side."""
    names = list(spec.factors)
    cells = itertools.product(*(spec.factors[n] for n in names))
    return [{**dict(zip(names, cell)), SEED_PARAM: seed} for cell in cells for seed in spec.seeds]


def as_sweep(ablation: AblationConfig) -> tuple[SweepConfig, SearchSpace]:
    spec = ablation.ablation
    points = grid(spec)
    trial = TrialConfig(**ablation.model_dump(include=set(TrialConfig.model_fields)))
    sweep = SweepConfig(
        **trial.model_dump(),
        name=ablation.name,
        search={"space": None, "num_trials": len(points), "metric": spec.metric, "baselines": points,
                "max_concurrent": spec.max_concurrent, "asha": {"enabled": False}},
        tracking=ablation.tracking.model_dump(),
        resources=ablation.resources.model_dump(),
        cluster=ablation.cluster.model_dump(),
        output_dir=ablation.output_dir,
        base_dir=ablation.base_dir,
    )
    return sweep, ablation_space(spec)


def report(sweep: SweepConfig, spec: AblationSpec, experiment_id: str, parent_run_id: str, folder: Path) -> Any:
    """Per-cell mean ± 95% CI and paired tests, recomputed from the logged per-item outputs."""
    from qsweep import tracking
    from qsweep.report.ablation import collect_cell_runs, summarize
    from qsweep.report.ablation_report import log_report

    mlflow_client = tracking.client(sweep.tracking.uri)
    runs = collect_cell_runs(mlflow_client, experiment_id, parent_run_id, list(spec.factors), spec.metric)
    result = summarize(runs, spec.factors, spec.reference or None, spec.metric)
    log_report(mlflow_client, parent_run_id, result, folder)
    return result
