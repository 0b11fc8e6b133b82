"""Evaluation: every task is a local YAML or an lm-eval task, every ranked metric one a task reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qsweep.config.schema import SweepConfig, TrialConfig
from qsweep.evaluate.harness import builtin_task_names, include_dirs, local_tasks, task_manager


def _local_tasks(sweep: SweepConfig) -> dict[str, Path]:
    dirs = include_dirs(sweep.evaluation.include_path, sweep.base_dir)
    return local_tasks([d for d in dirs if d.is_dir()])


def task_fields(trial: TrialConfig) -> dict[str, list[str]]:
    """The tasks a sweep scores, by the field that names them: every trial's, and the final stage's own."""
    final = trial.evaluation.final
    return {"evaluation.tasks": trial.evaluation.tasks, **({"evaluation.final.tasks": final.tasks} if final else {})}


def check_tasks(trial: TrialConfig, base_dir: Path) -> list[str]:
    dirs = include_dirs(trial.evaluation.include_path, base_dir)
    problems = [f"evaluation.include_path: {d} is not a folder; fix the path (relative to the sweep file)"
                for d in dirs if not d.is_dir()]
    local = local_tasks([d for d in dirs if d.is_dir()])
    named = task_fields(trial)
    unknown = [(field, t) for field, tasks in named.items() for t in tasks if t not in local]
    if unknown:
        # Building lm-eval's built-in index costs ~14 s: only when a task is not local.
        builtin = builtin_task_names()
        for field, task in unknown:
            if task not in builtin:
                problems.append(
                    f"{field}: {task!r} is neither a local task ({', '.join(sorted(local)) or 'none'}) "
                    "nor an lm-eval task; check the name or add its YAML to evaluation.include_path"
                )
    for task in named.get("evaluation.final.tasks", []):
        if task in trial.evaluation.tasks:
            problems.append(f"evaluation.final.tasks: {task!r} is in evaluation.tasks already, which the final "
                            "stage scores too; remove it from one of them")
    return problems


def _builtin_children(entry: Any) -> list[str]:
    """A built-in group lists its tasks in its config; a tag's index entry holds its members."""
    if entry is None or entry.kind.name not in ("GROUP", "TAG"):
        return []
    if entry.kind.name == "TAG":
        return sorted(entry.tags)
    children = (entry.cfg or {}).get("task", [])
    children = children if isinstance(children, list) else [children]
    names = [c.get("task") if isinstance(c, dict) else c for c in children]
    return [n for n in names if isinstance(n, str)]


def _builtin_members(name: str, seen: set[str] | None = None) -> set[str]:
    """The task and every task a built-in group or tag expands to: lm-eval reports each of them."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    members = {name}
    for child in _builtin_children(task_manager(True).task_index.get(name)):
        members |= _builtin_members(child, seen)
    return members


def _ranked_metrics(sweep: SweepConfig) -> list[tuple[str, str]]:
    """(field, metric) of every score the objective is built from."""
    if sweep.search.weights:
        return [(f"search.weights.{m}", m) for m in sweep.search.weights]
    return [("search.metric", sweep.search.metric)]


def check_metrics(sweep: SweepConfig) -> list[str]:
    problems = []
    for field, metric in _ranked_metrics(sweep):
        # The metric's name is only worth checking once its task is known to be evaluated.
        problems += _check_metric_task(sweep, field, metric) or _check_metric_name(sweep, field, metric)
    return problems


def _check_metric_task(sweep: SweepConfig, field: str, metric: str) -> list[str]:
    tasks = sweep.evaluation.tasks
    task, _, name = metric.partition("/")
    if not task or not name:
        return [f"{field}: {metric!r} is not TASK/METRIC; write it as lm-eval reports it, e.g. "
                f"{tasks[0]}/acc"]
    if task in tasks:
        return []
    if sweep.evaluation.final is not None and task in sweep.evaluation.final.tasks:
        return [f"{field}: task {task!r} is scored only in the final stage (evaluation.final.tasks), after the "
                f"search, so no trial could be ranked by it; rank by one of evaluation.tasks ({tasks}), or move "
                f"{task} to evaluation.tasks"]
    local = _local_tasks(sweep)
    # Only a built-in group or tag can report a task not named in evaluation.tasks (mmlu -> mmlu_anatomy).
    builtin = [t for t in tasks if t not in local]
    if builtin and any(t in builtin_task_names() and task in _builtin_members(t) for t in builtin):
        return []
    return [f"{field}: task {task!r} is not evaluated (evaluation.tasks: {tasks}), so no trial would "
            f"get a score; use one of those tasks, e.g. {tasks[0]}/{name}, or add {task} to evaluation.tasks"]


def _check_metric_name(sweep: SweepConfig, field: str, metric: str) -> list[str]:
    """For a local task that lists its metrics, the metric part must be one of them."""
    import yaml

    task, _, name = metric.partition("/")
    local = _local_tasks(sweep)
    if task not in local or task not in sweep.evaluation.tasks:
        return []
    try:
        config = yaml.load(local[task].read_text(), Loader=yaml.BaseLoader)
    except (OSError, yaml.YAMLError):
        return []  # the task check reports an unreadable task; lm-eval would fail on it anyway
    metrics = config.get("metric_list") if isinstance(config, dict) else None
    if not isinstance(metrics, list) or "filter_list" in config:
        return []  # defaults or filtered names: too many spellings to check here
    known = [m["metric"] for m in metrics if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    if not known or name in known or name in {f"{k}_stderr" for k in known}:
        return []
    return [f"{field}: task {task!r} reports {', '.join(known)}, not {name!r}; use e.g. {task}/{known[0]}"]
