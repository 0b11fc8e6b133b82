"""Search spaces: YAML → validated `SearchSpace` → Optuna define-by-run function → trial configs.

Parameter names are dotted paths into the trial config (`lora.r`, `quantization.quant_type`,
`training.learning_rate`, ...), so a space can search any field a trial has, not a fixed list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from qsweep.config.paths import resolve_path, shipped
from qsweep.config.schema import Strict, SweepFileError, TrialConfig, describe_validation_error, read_yaml

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
        return self

    def edge_values(self) -> list[Scalar]:
        """Every value this param can take at the extremes: enough to check each branch is valid."""
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.integer else float
        return [cast(self.low), cast(self.high)]

    def matches(self, chosen: dict[str, Any]) -> bool:
        for name, wanted in self.when.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if name not in chosen or chosen[name] not in allowed:
                return False
        return True


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
            seen.append(name)
        return self


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


def apply_params(base: TrialConfig, params: dict[str, Any]) -> TrialConfig:
    """The base trial with each dotted param set; raises ValidationError on a bad value."""
    data = base.model_dump()
    for dotted, value in params.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
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
            for value in spec.edge_values():
                try:
                    apply_params(base, {name: value})
                except ValidationError as exc:
                    for text in describe_validation_error(exc):
                        problems.append(f"params.{name} = {value!r} gives an invalid trial: {text}")
    return problems


def _suggest(trial: Any, name: str, spec: ParamSpec) -> Any:
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
                chosen[name] = _suggest(trial, name, spec)
