"""Tied search params (`lora.alpha: {ratio_of: lora.r, choices: [1, 2]}`) through a real Optuna study
and Ray's OptunaSearch, the baselines that name them, the steps a sweep's longest trial takes, and
the shipped chat space validated against real sweeps."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from qsweep.cli import app
from qsweep.config.schema import SweepConfig, TrialConfig
from qsweep.search.space import DefineByRun, ParamSpec, SearchSpace, apply_params, check_space, load_space

REPO = Path(__file__).resolve().parent.parent
CHAT = REPO / "search_spaces" / "qlora-chat.yaml"
KEY = "lora.alpha-per-lora.r"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def tied_space(**alpha) -> SearchSpace:
    return SearchSpace(params={"lora.r": ParamSpec(choices=[8, 16, 64]),
                               "lora.alpha": ParamSpec(ratio_of="lora.r", **(alpha or {"choices": [1, 2]}))})


def base_trial() -> TrialConfig:
    return TrialConfig(data={"train": "train.jsonl"})


def test_optuna_searches_the_ratio_and_the_trial_gets_the_value():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = DefineByRun(tied_space())
    seen = set()
    for _ in range(30):
        trial = study.ask()
        define(trial)
        study.tell(trial, 0.0)
        assert set(trial.params) == {"lora.r", KEY}
        assert trial.params[KEY] in (1, 2)
        config = apply_params(base_trial(), trial.params)
        assert config.lora.alpha == trial.params[KEY] * trial.params["lora.r"]
        seen.add((trial.params["lora.r"], config.lora.alpha))
    assert {(8, 8), (8, 16), (64, 128)} <= seen


def test_ray_hands_the_ratio_to_the_trial_under_its_own_name(tmp_path):
    """Ray's OptunaSearch unflattens `/` in names; the ratio's name survives it as one key."""
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=DefineByRun(tied_space()), metric="objective", mode="max", seed=0)
    config = searcher.suggest("t1")
    assert set(config) == {"lora.r", KEY}
    assert apply_params(base_trial(), config).lora.alpha == config[KEY] * config["lora.r"]


def test_a_tie_to_an_unsearched_field_multiplies_the_base_value():
    space = SearchSpace(params={"lora.alpha": ParamSpec(ratio_of="lora.r", low=0.5, high=4)})
    (name,) = [space.key(n) for n in space.params]
    assert apply_params(base_trial(), {name: 3.0}).lora.alpha == 3.0 * base_trial().lora.r
    assert check_space(space, base_trial()) == []


@pytest.mark.parametrize("params, message", [
    ({"lora.alpha": {"ratio_of": "lora.r", "choices": [1, 2]}, "lora.r": {"choices": [8]}},
     "params.lora.alpha.ratio_of names 'lora.r': list it before lora.alpha"),
    ({"lora.r": {"choices": [8]}, "lora.alpha": {"ratio_of": "lora.r", "choices": ["x"]}},
     "the ratios to lora.r must be numbers"),
    ({"lora.r": {"choices": [8]}, "lora.alpha": {"ratio_of": "lora.r", "choices": [1, 2]},
      "lora.dropout": {"choices": [0.0], "when": {"lora.alpha": 16}}},
     "params.lora.dropout.when names 'lora.alpha', a tied param; name 'lora.r'"),
])
def test_a_tie_the_space_cannot_resolve_is_refused_at_load(params, message):
    with pytest.raises(ValidationError, match=message):
        SearchSpace(params=params)


def test_check_space_tries_each_ratio_with_each_extreme_of_the_other():
    space = SearchSpace(params={"lora.r": ParamSpec(choices=[1, 8]),
                                "lora.alpha": ParamSpec(ratio_of="lora.r", choices=[0, 2])})
    assert check_space(space, base_trial()) == [
        "params.lora.alpha = 0 x lora.r = 1 gives an invalid trial: lora.alpha: Input should be greater than 0 (got 0)",
        "params.lora.alpha = 0 x lora.r = 8 gives an invalid trial: lora.alpha: Input should be greater than 0 (got 0)",
    ]
    unknown = SearchSpace(params={"lora.alpha": ParamSpec(ratio_of="lora.rank", choices=[1])})
    assert check_space(unknown, base_trial()) == [
        "params.lora.alpha.ratio_of: 'lora.rank' is no trial field; name one such as lora.r"]


# --- baselines: the value, as a sweep file writes it --------------------------------------------


def test_a_baseline_gives_the_tied_value_and_the_study_gets_the_ratio(tiny_sweep_dict, tmp_path):
    from qsweep.search.searcher import prepare_study

    tiny_sweep_dict["search"]["baselines"] = [{"lora.r": 16, "lora.alpha": 32}, {"lora.r": 8, "lora.alpha": 8}]
    sweep = SweepConfig(**tiny_sweep_dict)
    prepare_study(sweep, tmp_path, tied_space())
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.system_attrs["fixed_params"] for t in study.trials] == [{"lora.r": 16, KEY: 2}, {"lora.r": 8, KEY: 1}]
    define = DefineByRun(tied_space())
    trial = study.ask()
    define(trial)
    assert apply_params(sweep.trial(), trial.params).lora.alpha == 32


def _validate(sweep: dict, folder: Path, space: dict) -> tuple[int, str]:
    (folder / "space.yaml").write_text(yaml.safe_dump({"params": space}, sort_keys=False))
    sweep["search"]["space"] = str(folder / "space.yaml")
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(folder / "sweep.yaml")])
    return result.exit_code, " ".join(result.output.split())


def test_validate_names_a_baseline_whose_tied_value_the_space_cannot_give(tiny_sweep_dict, tmp_path):
    space = {"lora.r": {"choices": [8, 16]}, "lora.alpha": {"ratio_of": "lora.r", "choices": [1, 2]}}
    tiny_sweep_dict["search"]["baselines"] = [{"lora.r": 16, "lora.alpha": 32}, {"lora.r": 16, "lora.alpha": 24},
                                              {"lora.alpha": 16}]
    code, output = _validate(tiny_sweep_dict, tmp_path, space)
    assert code == 2, output
    assert "search.baselines.0" not in output
    assert ("search.baselines.1: lora.alpha = 24 is 1.5 x lora.r (16), a ratio the space does not search "
            "(choices [1, 2])") in output
    assert "search.baselines.2: lora.alpha is tied to lora.r, which the space searches: give lora.r too" in output


# --- the shipped chat space ------------------------------------------------------------------------


def test_the_chat_space_follows_the_published_advice():
    space = load_space(CHAT)
    lr = space.params["training.learning_rate"]
    assert (lr.low, lr.high, lr.log) == (1e-5, 5e-4, True)
    assert space.params["lora.r"].choices == [8, 16, 32, 64, 128, 256]
    assert (space.params["lora.alpha"].ratio_of, space.params["lora.alpha"].choices) == ("lora.r", [1, 2])
    assert space.params["lora.dropout"].choices == [0.0, 0.05, 0.1]
    assert space.params["lora.use_dora"].choices == space.params["lora.use_rslora"].choices == [False, True]
    assert "lora.target_modules" not in space.params, "all-linear, the trial default, is kept"


@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m"])
def test_the_chat_space_validates_against_a_sweep(tiny_sweep_dict, tmp_path, model):
    tiny_sweep_dict["model"]["name"] = model
    tiny_sweep_dict["search"]["space"] = "qlora-chat"
    tiny_sweep_dict["search"]["baselines"] = [{"lora.r": 16, "lora.alpha": 32, "training.learning_rate": 2e-4}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep_dict, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


# --- the steps of the longest trial (ASHA's last rung) -------------------------------------------


def test_the_longest_trial_counts_every_extreme_that_adds_steps(tiny_sweep_dict):
    from qsweep.orchestrate.steps import longest_trial_steps

    tiny_sweep_dict["training"] = {"num_epochs": 1, "batch_size": 8}
    sweep = SweepConfig(**tiny_sweep_dict)
    assert longest_trial_steps(sweep, None, 93) == 12
    space = SearchSpace(params={"training.num_epochs": ParamSpec(choices=[1, 3]),
                                "training.batch_size": ParamSpec(choices=[4, 8])})
    assert longest_trial_steps(sweep, space, 93) == 3 * 24
    steps = SearchSpace(params={"training.max_steps": ParamSpec(low=10, high=300, integer=True)})
    tiny_sweep_dict["training"] = {"max_steps": 40}
    assert longest_trial_steps(SweepConfig(**tiny_sweep_dict), steps, 0) == 300


def test_the_live_view_and_status_show_the_ratio_by_its_fields_short_names():
    from qsweep.report.progress import short_params

    assert short_params({"lora.r": 16, KEY: 2, "lora.use_dora": True}) == "r=16 alpha/r=2 use_dora=True"
