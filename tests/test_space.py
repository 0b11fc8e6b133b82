"""Search spaces: YAML loading and validation, Optuna define-by-run sampling, applying params."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import optuna
import pytest
import yaml
from pydantic import ValidationError

from qsweep.config.schema import SweepFileError, TrialConfig, load_sweep
from qsweep.search.space import (
    DefineByRun,
    ParamSpec,
    SearchSpace,
    apply_params,
    check_space,
    find_space_file,
    load_space,
)

REPO = Path(__file__).resolve().parent.parent
QLORA = REPO / "search_spaces" / "qlora.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def base_trial() -> TrialConfig:
    return TrialConfig(data={"train": "train.jsonl"})


def write_space(folder: Path, data: dict) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sample(space: SearchSpace, n: int, seed: int = 0, sampler: str = "tpe") -> list[optuna.trial.FrozenTrial]:
    """n trials asked from a real study, told a value so TPE leaves its random start-up phase."""
    if sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    else:
        chosen = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=chosen)
    define = DefineByRun(space)
    for index in range(n):
        trial = study.ask()
        assert define(trial) is None
        study.tell(trial, float(len(trial.params)) + (index % 3) * 0.1)
    return study.trials


# --- the shipped space --------------------------------------------------------------------------


def test_shipped_qlora_space_loads():
    space = load_space(QLORA)
    assert list(space.params) == [
        "quantization.quant_type",
        "quantization.double_quant",
        "lora.r",
        "lora.alpha",
        "lora.dropout",
        "lora.target_modules",
        "training.learning_rate",
    ]
    assert space.params["quantization.quant_type"].choices == ["nf4", "fp4"]
    assert space.params["quantization.double_quant"].choices == [True, False]
    assert space.params["lora.r"].choices == [4, 8, 16, 32, 64]
    assert all(type(v) is int for v in space.params["lora.r"].choices)
    lr = space.params["training.learning_rate"]
    assert (lr.low, lr.high, lr.log) == (1e-4, 3e-3, True)
    assert all(not spec.when for spec in space.params.values())


def test_shipped_space_is_valid_against_the_quickstart_trial():
    sweep = load_sweep(REPO / "sweeps" / "quickstart.yaml")
    assert check_space(load_space(QLORA), sweep.trial()) == []


def test_find_space_file_by_shipped_name_and_by_path(tmp_path):
    assert find_space_file("qlora", tmp_path).resolve() == QLORA.resolve()
    assert find_space_file(str(QLORA), tmp_path) == QLORA
    with pytest.raises(SweepFileError, match="not found"):
        find_space_file("no-such-space", tmp_path)


# --- sampling with a real Optuna study ----------------------------------------------------------


def test_define_by_run_suggests_within_declared_bounds_and_choices():
    space = load_space(QLORA)
    trials = sample(space, 40, seed=0)
    for trial in trials:
        assert set(trial.params) == set(space.params)
        for name, value in trial.params.items():
            spec = space.params[name]
            if spec.choices is not None:
                assert value in spec.choices, (name, value)
                assert type(value) is type(spec.choices[spec.choices.index(value)])
            else:
                assert spec.low <= value <= spec.high, (name, value)
    # Every choice of a small categorical gets tried at some point.
    assert {t.params["quantization.quant_type"] for t in trials} == {"nf4", "fp4"}
    assert {t.params["quantization.double_quant"] for t in trials} == {True, False}


def test_sampled_params_give_valid_trials():
    space = load_space(QLORA)
    for trial in sample(space, 15, seed=1):
        config = apply_params(base_trial(), trial.params)
        assert config.lora.r == trial.params["lora.r"]
        assert config.training.learning_rate == trial.params["training.learning_rate"]


def test_log_scale_is_declared_to_optuna():
    space = load_space(QLORA)
    (trial,) = sample(space, 1)
    lr = trial.distributions["training.learning_rate"]
    assert isinstance(lr, optuna.distributions.FloatDistribution)
    assert (lr.low, lr.high, lr.log) == (1e-4, 3e-3, True)
    dropout = trial.distributions["lora.dropout"]
    assert (dropout.low, dropout.high, dropout.log) == (0.0, 0.1, False)
    assert isinstance(trial.distributions["lora.r"], optuna.distributions.CategoricalDistribution)


def test_log_scale_spreads_samples_over_decades():
    """Log-uniform on [1e-4, 1e-2]: about half below 1e-3. Uniform would put ~9% there."""
    space = SearchSpace(params={"training.learning_rate": ParamSpec(low=1e-4, high=1e-2, log=True)})
    values = [t.params["training.learning_rate"] for t in sample(space, 300, seed=3, sampler="random")]
    assert all(1e-4 <= v <= 1e-2 for v in values)
    below = sum(v < 1e-3 for v in values) / len(values)
    assert 0.35 < below < 0.65, below
    decades = {math.floor(math.log10(v)) for v in values}
    assert decades == {-4, -3}


def test_integer_and_step_params():
    space = SearchSpace(
        params={
            "lora.r": ParamSpec(low=4, high=64, integer=True, step=4),
            "lora.dropout": ParamSpec(low=0.0, high=0.2, step=0.05),
            "training.max_steps": ParamSpec(low=10, high=1000, integer=True, log=True),
        }
    )
    for trial in sample(space, 30, seed=2):
        r, dropout, steps = (trial.params[k] for k in ("lora.r", "lora.dropout", "training.max_steps"))
        assert type(r) is int and 4 <= r <= 64 and r % 4 == 0
        assert 0.0 <= dropout <= 0.2 and round(dropout / 0.05, 6) == round(dropout / 0.05)
        assert type(steps) is int and 10 <= steps <= 1000
        assert trial.distributions["training.max_steps"].log is True


CONDITIONAL = {
    "params": {
        "quantization.quant_type": {"choices": ["nf4", "fp4"]},
        "quantization.double_quant": {"choices": [True, False], "when": {"quantization.quant_type": "nf4"}},
        "lora.r": {"choices": [4, 8, 16]},
        "lora.alpha": {"low": 8, "high": 64, "integer": True, "when": {"lora.r": [8, 16]}},
        "lora.dropout": {
            "low": 0.0,
            "high": 0.1,
            "when": {"quantization.quant_type": "nf4", "quantization.double_quant": False},
        },
    }
}


def test_conditional_params_appear_exactly_when_their_condition_holds(tmp_path):
    space = load_space(write_space(tmp_path, CONDITIONAL))
    trials = sample(space, 60, seed=0)
    seen = {"dq": set(), "alpha": set(), "dropout": set()}
    for trial in trials:
        p = trial.params
        nf4 = p["quantization.quant_type"] == "nf4"
        assert ("quantization.double_quant" in p) == nf4, p
        assert ("lora.alpha" in p) == (p["lora.r"] in (8, 16)), p
        assert ("lora.dropout" in p) == (nf4 and p["quantization.double_quant"] is False), p
        seen["dq"].add(nf4)
        seen["alpha"].add("lora.alpha" in p)
        seen["dropout"].add("lora.dropout" in p)
        if "lora.alpha" in p:
            assert 8 <= p["lora.alpha"] <= 64
    # Both branches of every condition were exercised.
    assert seen == {"dq": {True, False}, "alpha": {True, False}, "dropout": {True, False}}


def test_conditional_params_apply_to_valid_trials(tmp_path):
    space = load_space(write_space(tmp_path, CONDITIONAL))
    base = base_trial()
    for trial in sample(space, 20, seed=5):
        config = apply_params(base, trial.params)
        if "quantization.double_quant" not in trial.params:
            assert config.quantization.double_quant == base.quantization.double_quant


def test_param_spec_matches():
    spec = ParamSpec(choices=[1], when={"a": "x", "b": [1, 2]})
    assert spec.matches({"a": "x", "b": 2})
    assert not spec.matches({"a": "x", "b": 3})
    assert not spec.matches({"a": "y", "b": 1})
    assert not spec.matches({"b": 1})
    assert ParamSpec(choices=[1]).matches({})


@pytest.mark.parametrize("dep", ["lora.alpha", "training.seed"], ids=["later", "unknown"])
def test_when_naming_a_later_or_unknown_param_is_rejected(tmp_path, dep):
    data = {
        "params": {
            "lora.r": {"choices": [8, 16], "when": {dep: 16}},
            "lora.alpha": {"choices": [16, 32]},
        }
    }
    with pytest.raises(SweepFileError) as info:
        load_space(write_space(tmp_path, data))
    (problem,) = info.value.problems
    assert f"params.lora.r.when names {dep!r}" in problem
    assert "not a param listed before it" in problem


def test_when_naming_itself_is_rejected():
    with pytest.raises(ValidationError, match="listed before it"):
        SearchSpace(params={"lora.r": ParamSpec(choices=[8], when={"lora.r": 8})})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"choices": [1], "low": 0, "high": 1}, "either choices or low/high"),
        ({"low": 0.1}, "both low and high"),
        ({}, "both low and high"),
        ({"low": 2, "high": 1}, "is above high"),
        ({"low": 0, "high": 1, "log": True}, "log scale needs low > 0"),
        ({"choices": []}, "at least 1"),
        ({"choices": [1], "typo": True}, "unknown key"),
    ],
)
def test_bad_param_specs_are_rejected(tmp_path, spec, message):
    with pytest.raises(SweepFileError) as info:
        load_space(write_space(tmp_path, {"params": {"lora.r": spec}}))
    assert any(message in p and "params.lora.r" in p for p in info.value.problems), info.value.problems


def test_log_with_step_is_rejected_at_load(tmp_path):
    data = {"params": {"training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}}}
    with pytest.raises(SweepFileError):
        load_space(write_space(tmp_path, data))


# --- check_space --------------------------------------------------------------------------------


def test_check_space_accepts_a_good_space():
    space = SearchSpace(
        params={
            "lora.r": ParamSpec(low=1, high=128, integer=True),
            "lora.dropout": ParamSpec(low=0.0, high=0.5),
            "quantization.quant_type": ParamSpec(choices=["nf4", "fp4"]),
        }
    )
    assert check_space(space, base_trial()) == []


@pytest.mark.parametrize("name", ["lora.rank", "training.lr", "lora.r.value", "nothing"])
def test_check_space_flags_a_name_that_is_not_a_trial_field(name):
    problems = check_space(SearchSpace(params={name: ParamSpec(choices=[1])}), base_trial())
    assert len(problems) == 1
    assert problems[0].startswith(f"params.{name}: no such trial field")


def test_check_space_flags_an_out_of_range_extreme():
    space = SearchSpace(params={"lora.dropout": ParamSpec(low=0.0, high=1.5)})
    problems = check_space(space, base_trial())
    assert len(problems) == 1
    assert problems[0].startswith("params.lora.dropout = 1.5 gives an invalid trial")
    assert "lora.dropout" in problems[0].split("invalid trial:")[1]


def test_check_space_flags_every_bad_choice_and_keeps_going():
    space = SearchSpace(
        params={
            "quantization.quant_type": ParamSpec(choices=["nf4", "int8"]),
            "lora.r": ParamSpec(low=0, high=8, integer=True),
            "training.typo": ParamSpec(choices=[1]),
        }
    )
    problems = check_space(space, base_trial())
    assert len(problems) == 3
    assert any(p.startswith("params.quantization.quant_type = 'int8'") for p in problems)
    assert any(p.startswith("params.lora.r = 0") for p in problems)
    assert any(p.startswith("params.training.typo: no such trial field") for p in problems)


# --- apply_params -------------------------------------------------------------------------------


def test_apply_params_sets_nested_fields_and_leaves_the_base_alone():
    base = base_trial()
    trial = apply_params(
        base,
        {
            "lora.r": 64,
            "lora.target_modules": "attention",
            "quantization.quant_type": "fp4",
            "training.learning_rate": 3e-4,
            "data.max_seq_length": 128,
        },
    )
    assert (trial.lora.r, trial.lora.target_modules) == (64, "attention")
    assert trial.quantization.quant_type == "fp4"
    assert trial.training.learning_rate == 3e-4
    assert trial.data.max_seq_length == 128
    # Untouched fields keep the base's values, and the base itself is unchanged.
    assert trial.lora.alpha == base.lora.alpha and trial.data.train == base.data.train
    assert base.lora.r == 16 and base.quantization.quant_type == "nf4"


def test_apply_params_with_nothing_is_the_base():
    base = base_trial()
    assert apply_params(base, {}) == base


def test_apply_params_rejects_bad_values():
    with pytest.raises(ValidationError):
        apply_params(base_trial(), {"lora.dropout": 1.0})


# --- pickling (Ray checkpoints the searcher) ----------------------------------------------------


def test_define_by_run_pickles_and_samples_the_same(tmp_path):
    define = DefineByRun(load_space(write_space(tmp_path, CONDITIONAL)))
    clone = pickle.loads(pickle.dumps(define))
    assert clone.space == define.space

    def params(fn: DefineByRun) -> list[dict]:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=7, n_startup_trials=3))
        out = []
        for index in range(8):
            trial = study.ask()
            fn(trial)
            study.tell(trial, float(index % 4))
            out.append(trial.params)
        return out

    assert params(clone) == params(define)
