"""The search space and the baselines: loadable, every `when:` reachable, every baseline a valid trial."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from qsweep.config.schema import SweepConfig, SweepFileError, describe_validation_error
from qsweep.search.space import ParamSpec, SearchSpace, apply_params, check_space, find_space_file, load_space


def load_space_of(sweep: SweepConfig) -> tuple[SearchSpace | None, str, list[str]]:
    """The search space, the file it came from, and its problems (each branch's extremes included)."""
    if not sweep.search.space:
        # No space: every trial is the sweep's own trial (repeats of one config, each scored).
        return SearchSpace(description="the sweep's own trial only"), "", []
    try:
        space_file = find_space_file(sweep.search.space, sweep.base_dir)
    except SweepFileError as exc:
        return None, "", [f"search.space: {p}; give a path relative to the sweep file or a shipped name (qlora)"
                          for p in exc.problems]
    try:
        space = load_space(space_file)
    except SweepFileError as exc:
        # A model-level error has no field of its own: drop the empty location pydantic leaves.
        return None, str(space_file), [f"search.space ({space_file}): {p.removeprefix(': ')}" for p in exc.problems]
    return space, str(space_file), [f"search.space ({space_file}): {p}" for p in check_space(space, sweep.trial())]


def _when_value_problem(parent: str, spec: ParamSpec, value: Any) -> str | None:
    """Why the param `parent` (searched by `spec`) can never equal `value`, or None when it can."""
    if spec.choices is not None:
        # The same `in` test ParamSpec.matches applies when the sweep runs.
        return None if value in spec.choices else f"{parent} never takes {value!r} (its choices are {spec.choices})"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"{parent} is a low/high range, so it never takes {value!r}"
    if not spec.low <= value <= spec.high:
        return f"{value!r} is outside the range of {parent} [{spec.low:g}, {spec.high:g}]"
    if not spec.integer:
        return f"{parent} is a continuous range that never hits {value!r} exactly; give {parent} choices instead"
    if (value - spec.low) % (spec.step or 1):
        return f"{parent} steps from {spec.low:g} by {spec.step or 1:g} and never takes {value!r}"
    return None


def check_when_values(space: SearchSpace, source: str) -> list[str]:
    """A `when:` value the parent param never takes silently disables the conditional param."""
    problems = []
    for name, spec in space.params.items():
        for parent, wanted in spec.when.items():
            parent_spec = space.params.get(parent)
            if parent_spec is None:
                continue  # SearchSpace already rejects a `when:` naming an unknown param
            for value in wanted if isinstance(wanted, list) else [wanted]:
                if why := _when_value_problem(parent, parent_spec, value):
                    problems.append(f"search.space ({source}): params.{name}.when.{parent}: {why}, so {name} would "
                                    f"never be suggested; use a value {parent} can take")
    return problems


def check_baselines(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    problems = []
    names = set(space.params) if space else set()
    for index, point in enumerate(sweep.search.baselines):
        if unknown := set(point) - names:
            problems.append(f"search.baselines.{index}: {sorted(unknown)} not in the search space ({sorted(names)}); "
                            "a baseline may only set the space's params")
            continue
        try:
            apply_params(sweep.trial(), space.trial_point(point, sweep.trial()) if space else point)
        except ValidationError as exc:
            problems += [f"search.baselines.{index}: {p}" for p in describe_validation_error(exc)]
        except ValueError as exc:
            problems.append(f"search.baselines.{index}: {exc}")
    return problems
