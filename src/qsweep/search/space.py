"""Search spaces: YAML → validated `SearchSpace` → Optuna define-by-run function → trial configs.

Parameter names are dotted paths into the trial config (`lora.r`, `quantization.quant_type`,
`training.learning_rate`, ...), so a space can search any field a trial has, not a fixed list.

A tied parameter is a multiple of another (`lora.alpha: {ratio_of: lora.r, choices: [1, 2]}`):
Optuna searches the ratio, under the name `lora.alpha-per-lora.r`, and apply_params sets the field
to ratio x the other's value. A trial's params (Ray's config, MLflow's `search.*`) then hold the
ratio and its resolved config the value. Field names never hold a "-", so the two cannot be confused.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from qsweep.config.paths import resolve_path, shipped
from qsweep.config.schema import RATIO_JOIN, Strict, SweepFileError, TrialConfig, describe_validation_error, read_yaml

Scalar = bool | int | float | str | None


class ParamSpec(Strict):
    choices: list[Scalar] | None = Field(None, min_length=1)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = Field(False, description="suggest whole numbers between low and high")
    when: dict[str, Scalar | list[Scalar]] = Field(
        default_factory=dict, description="only suggest this param when earlier params have these values"
    )
    ratio_of: str | None = Field(None, description="a multiple of this field: choices or low/high give the ratio")

    @model_validator(mode="after")
    def _one_kind(self) -> "ParamSpec":
        ranged = self.low is not None or self.high is not None
        if self.choices is not None and ranged:
            raise ValueError("give either choices or low/high, not both")
        if self.choices is None:
            if self.low is None or self.high is None:
                raise ValueError("give choices, or both low and high")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) is above high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("log scale needs low > 0")
            if self.log and self.step is not None:
                raise ValueError("Optuna cannot combine log: true with step; drop one of them")
            if self.integer and self.step is not None and (self.step < 1 or self.step != int(self.step)):
                raise ValueError(f"an integer param needs a whole step >= 1 (got {self.step})")
        elif self.ratio_of and not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.choices):
            raise ValueError(f"the ratios to {self.ratio_of} must be numbers (got {self.choices})")
        return self

    def edge_values(self) -> list[Scalar]:
        """Every value this param can take at the extremes: enough to check each branch is valid."""
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.integer else float
        return [cast(self.low), cast(self.high)]

    def allows(self, value: Any) -> bool:
        """Whether the param can take `value` (exactly, for choices; within bounds, for a range)."""
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high and (not self.integer or float(value).is_integer())

    def describe(self) -> str:
        return f"choices {self.choices}" if self.choices is not None else f"range [{self.low:g}, {self.high:g}]"

    def matches(self, chosen: dict[str, Any]) -> bool:
        for name, wanted in self.when.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if name not in chosen or chosen[name] not in allowed:
                return False
        return True


def ratio_key(name: str, base: str) -> str:
    """The name Optuna, Ray and MLflow's `search.*` know a tied param by: `lora.alpha-per-lora.r`."""
    return f"{name}{RATIO_JOIN}{base}"


class SearchSpace(Strict):
    description: str = ""
    params: dict[str, ParamSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _conditions_name_earlier_params(self) -> "SearchSpace":
        seen: list[str] = []
        for name, spec in self.params.items():
            for dep in spec.when:
                if dep not in seen:
                    raise ValueError(f"params.{name}.when names {dep!r}, which is not a param listed before it")
                if self.params[dep].ratio_of:
                    raise ValueError(f"params.{name}.when names {dep!r}, a tied param; name "
                                     f"{self.params[dep].ratio_of!r}, the param it is a multiple of, instead")
            base = spec.ratio_of
            if base in self.params and (base not in seen or self.params[base].ratio_of):
                raise ValueError(f"params.{name}.ratio_of names {base!r}: list it before {name}, and not as a "
                                 "multiple of another param itself")
            seen.append(name)
        return self

    def key(self, name: str) -> str:
        """The name Optuna searches the param `name` under (its ratio's, for a tied param)."""
        base = self.params[name].ratio_of
        return ratio_key(name, base) if base else name

    def trial_point(self, point: dict[str, Any], base: TrialConfig) -> dict[str, Any]:
        """A baseline's point (values of trial fields, as a sweep file writes them) as Optuna's
        params: a tied param's value becomes its ratio to the other field's value, taken from the
        point or, when the space does not search it, from the base trial. Raises ValueError."""
        found = {}
        for name, value in point.items():
            tied_to = self.params[name].ratio_of
            if not tied_to:
                found[name] = value
                continue
            if tied_to in self.params and tied_to not in point:
                raise ValueError(f"{name} is tied to {tied_to}, which the space searches: give {tied_to} too")
            other = point[tied_to] if tied_to in point else field_value(base, tied_to)
            ratio = value / other
            found[self.key(name)] = int(ratio) if float(ratio).is_integer() else ratio
            if not self.params[name].allows(found[self.key(name)]):
                raise ValueError(f"{name} = {value!r} is {ratio:g} x {tied_to} ({other!r}), a ratio the space "
                                 f"does not search ({self.params[name].describe()})")
        return found


def find_space_file(value: str, base_dir: Path) -> Path:
    """A path relative to the sweep file, else a shipped space by name (`qlora`)."""
    candidate = resolve_path(value, base_dir)
    if candidate.exists():
        return candidate
    for folder in (base_dir / "search_spaces", base_dir.parent / "search_spaces", shipped("search_spaces")):
        for name in (value, f"{value}.yaml"):
            if (folder / name).exists():
                return folder / name
    raise SweepFileError("search.space", [f"search space {value!r} not found next to the sweep file or shipped"])


def load_space(path: Path) -> SearchSpace:
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SweepFileError(str(path), ["a search space is a mapping with a `params` key"])
    try:
        return SearchSpace(**raw)
    except ValidationError as exc:
        raise SweepFileError(str(path), describe_validation_error(exc)) from None


# A trial trains for steps or for epochs: a param setting one replaces the base trial's other.
EXCLUSIVE = {"training.max_steps": "training.num_epochs", "training.num_epochs": "training.max_steps"}


def field_value(trial: TrialConfig, dotted: str) -> Any:
    node: Any = trial
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def apply_params(base: TrialConfig, params: dict[str, Any]) -> TrialConfig:
    """The base trial with each dotted param set, tied params (`A-per-B`: ratio) last as ratio x
    B's value; raises ValidationError on a bad value."""
    data = base.model_dump()
    plain = {name: value for name, value in params.items() if RATIO_JOIN not in name}
    for dotted, value in plain.items():
        _set(data, dotted, value)
        if value is not None and dotted in EXCLUSIVE and EXCLUSIVE[dotted] not in plain:
            _set(data, EXCLUSIVE[dotted], None)
    for key, ratio in params.items():
        if RATIO_JOIN in key:
            name, tied_to = key.split(RATIO_JOIN)
            _set(data, name, ratio * field_value(TrialConfig(**data), tied_to))
    return TrialConfig(**data)


def check_space(space: SearchSpace, base: TrialConfig) -> list[str]:
    """Every param names a real field and every extreme value gives a valid trial."""
    problems = []
    for name, spec in space.params.items():
        node: Any = base
        for part in name.split("."):
            if not isinstance(node, Strict) or part not in type(node).model_fields:
                problems.append(f"params.{name}: no such trial field; use a dotted path such as lora.r or training.learning_rate")
                break
            node = getattr(node, part)
        else:
            problems += _edge_problems(space, name, base)
    return problems


def _edge_problems(space: SearchSpace, name: str, base: TrialConfig) -> list[str]:
    """Each extreme value of `name` (of a tied param: each ratio with each extreme of the other) on the base."""
    spec, tied_to = space.params[name], space.params[name].ratio_of
    if tied_to and tied_to not in space.params:
        try:
            field_value(base, tied_to)
        except AttributeError:
            return [f"params.{name}.ratio_of: {tied_to!r} is no trial field; name one such as lora.r"]
    others = space.params[tied_to].edge_values() if tied_to in space.params else [None]
    problems = []
    for value, other in itertools.product(spec.edge_values(), others):
        point = {space.key(name): value, **({tied_to: other} if other is not None else {})}
        try:
            apply_params(base, point)
        except (ValidationError, TypeError) as exc:
            texts = describe_validation_error(exc) if isinstance(exc, ValidationError) else [str(exc)]
            shown = f"{value!r}" + (f" x {tied_to}" if tied_to else "")
            shown += f" = {other!r}" if other is not None else ""
            problems += [f"params.{name} = {shown} gives an invalid trial: {text}" for text in texts]
    return problems


def _suggest(trial: Any, name: str, spec: ParamSpec) -> Any:
    """`name` is the param's key (its ratio's, for a tied param)."""
    if spec.choices is not None:
        return trial.suggest_categorical(name, spec.choices)
    if spec.integer:
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


class DefineByRun:
    """Optuna define-by-run function: params in file order, conditional ones only when `when` holds.

    A class, not a closure, because Ray Tune pickles the searcher (and this with it) to checkpoint.
    """

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for name, spec in self.space.params.items():
            if spec.matches(chosen):
                chosen[name] = _suggest(trial, self.space.key(name), spec)
