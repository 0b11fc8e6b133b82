"""Everything checkable before training: one list of problems, each naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from qsweep.config import SweepConfig, SweepFileError, TrialConfig, describe_validation_error
from qsweep.data import is_local, local_path, template_fields
from qsweep.evaluate import include_dirs, local_tasks
from qsweep.models import is_local_or_embedded
from qsweep.space import SearchSpace, apply_params, check_space, find_space_file, load_space
from qsweep.targets import TargetModuleError, linear_module_names, resolve_target_modules


def _check_data(trial: TrialConfig, base_dir: Path) -> list[str]:
    import json

    problems = []
    needed = template_fields(trial.data.prompt) | template_fields(trial.data.completion)
    for field in ("train", "validation"):
        source = getattr(trial.data, field)
        if source is None or not is_local(source, base_dir):
            continue
        path = local_path(source, base_dir)
        if not path.exists():
            problems.append(f"data.{field}: file {path} does not exist; fix the path (relative to the sweep file)")
            continue
        if path.suffix == ".jsonl":
            first = path.open().readline()
            try:
                columns = set(json.loads(first)) if first.strip() else set()
            except json.JSONDecodeError:
                problems.append(f"data.{field}: first line of {path} is not JSON")
                continue
            if not columns:
                problems.append(f"data.{field}: {path} is empty")
            elif missing := needed - columns:
                problems.append(
                    f"data.{field}: {path} lacks column(s) {sorted(missing)} used by data.prompt/data.completion; "
                    f"its columns are {sorted(columns)}"
                )
    return problems


def _check_tasks(trial: TrialConfig, base_dir: Path) -> list[str]:
    from qsweep.evaluate import builtin_task_names

    dirs = include_dirs(trial.evaluation.include_path, base_dir)
    problems = [f"evaluation.include_path: {d} is not a folder" for d in dirs if not d.is_dir()]
    local = local_tasks([d for d in dirs if d.is_dir()])
    unknown = [t for t in trial.evaluation.tasks if t not in local]
    if unknown:
        builtin = builtin_task_names()
        for task in unknown:
            if task not in builtin:
                problems.append(
                    f"evaluation.tasks: {task!r} is neither a local task ({', '.join(sorted(local)) or 'none'}) "
                    "nor an lm-eval task; check the name or add its YAML to evaluation.include_path"
                )
    return problems


def _check_targets(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    if not is_local_or_embedded(sweep.model.name, sweep.base_dir):
        return []
    from qsweep.models import resolve_model

    names = linear_module_names(resolve_model(sweep.model.name, sweep.model.revision, sweep.base_dir).path,
                                sweep.model.trust_remote_code)
    candidates = [("lora.target_modules", sweep.lora.target_modules)]
    if space and "lora.target_modules" in space.params:
        candidates += [(f"params.lora.target_modules = {v!r}", v)
                       for v in space.params["lora.target_modules"].edge_values()]
    problems = []
    for where, spec in candidates:
        try:
            resolve_target_modules(spec, names)
        except TargetModuleError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def _check_baselines(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    problems = []
    names = set(space.params) if space else set()
    for index, point in enumerate(sweep.search.baselines):
        if unknown := set(point) - names:
            problems.append(f"search.baselines.{index}: {sorted(unknown)} not in the search space ({sorted(names)})")
            continue
        try:
            apply_params(sweep.trial(), point)
        except ValidationError as exc:
            problems += [f"search.baselines.{index}: {p}" for p in describe_validation_error(exc)]
    return problems


def validate_sweep(sweep: SweepConfig, source: str) -> SearchSpace | None:
    """Raises SweepFileError with every problem found; returns the loaded search space."""
    problems: list[str] = []
    space = None
    if sweep.search.space:
        try:
            space_file = find_space_file(sweep.search.space, sweep.base_dir)
            space = load_space(space_file)
            problems += [f"search.space ({space_file.name}) {p}" for p in check_space(space, sweep.trial())]
        except SweepFileError as exc:
            problems += [f"search.space: {p}" for p in exc.problems]
    problems += _check_baselines(sweep, space)
    problems += _check_data(sweep.trial(), sweep.base_dir)
    problems += _check_tasks(sweep.trial(), sweep.base_dir)
    problems += _check_targets(sweep, space)
    if problems:
        raise SweepFileError(source, problems)
    return space
