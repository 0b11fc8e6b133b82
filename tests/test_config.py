"""The sweep file: shipped example parses, mistakes are reported by field, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qsweep.config.schema import SweepConfig, SweepFileError, TrialConfig, dump_yaml, load_sweep
from qsweep.search.space import apply_params

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"


def write_sweep(folder: Path, data: dict | str, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SweepFileError) as info:
        load_sweep(path)
    assert info.value.source == str(path)
    assert info.value.problems, "a SweepFileError must carry at least one problem"
    # The message is every problem, each on its own line, prefixed with the file.
    assert str(info.value).splitlines() == [f"{path}: {p}" for p in info.value.problems]
    return info.value.problems


@pytest.fixture
def minimal() -> dict:
    return {"name": "mini", "data": {"train": "train.jsonl"}}


# --- the shipped example ---------------------------------------------------------------------


def test_quickstart_parses_with_its_values():
    sweep = load_sweep(QUICKSTART)
    assert sweep.name == "quickstart"
    assert sweep.model.name == "smollm2-135m"
    assert sweep.quantization.quant_type == "nf4" and sweep.quantization.double_quant is True
    assert (sweep.lora.r, sweep.lora.alpha, sweep.lora.dropout) == (16, 32, 0.05)
    assert sweep.lora.target_modules == "all-linear"
    assert sweep.training.learning_rate == pytest.approx(1e-3)
    # ASHA's rungs must fall on validation reports, strictly before the last step.
    assert sweep.training.max_steps % sweep.training.eval_every == 0
    assert sweep.search.asha.grace_steps % sweep.training.eval_every == 0
    assert sweep.search.asha.grace_steps < sweep.training.max_steps
    # Issue 20's newcomer sweep: at least 8 trials of both 4-bit types under ASHA, the MMLU guard on the finalists.
    assert sweep.search.num_trials >= 8 and sweep.search.metric == "zorble/acc" and sweep.search.asha.enabled
    assert sweep.search.direction == "maximize"
    assert {b["quantization.quant_type"] for b in sweep.search.baselines} == {"nf4", "fp4"}
    assert sweep.evaluation.tasks == ["zorble"]
    final = sweep.evaluation.final
    assert final.top_k >= 2 and final.tasks == ["mmlu_offline"] and final.per_subject == 1
    assert sweep.tracking.experiment == "quickstart"
    assert sweep.base_dir == QUICKSTART.parent.resolve()


def test_quickstart_relative_paths_resolve_next_to_the_file():
    sweep = load_sweep(QUICKSTART)
    for value in (sweep.data.train, sweep.data.validation, sweep.search.space):
        path = sweep.resolve_path(value)
        assert path.is_absolute() and path.exists(), value
    assert sweep.resolve_path(sweep.data.train) == REPO / "evaluation" / "tasks" / "zorble" / "train.jsonl"


def test_quickstart_baselines_are_valid_trials():
    sweep = load_sweep(QUICKSTART)
    assert len(sweep.search.baselines) == 2
    trials = [apply_params(sweep.trial(), point) for point in sweep.search.baselines]
    assert [t.quantization.quant_type for t in trials] == ["nf4", "fp4"]
    # The sweep's own double quant: each scores its type's untuned base on the base it loads anyway.
    assert [t.quantization.double_quant for t in trials] == [True, True]


def test_minimal_sweep_gets_defaults(tmp_path, minimal):
    sweep = load_sweep(write_sweep(tmp_path, minimal))
    assert sweep.model.name == "smollm2-135m"
    assert sweep.lora.target_modules == "all-linear"
    assert sweep.evaluation.tasks == ["zorble"]
    assert sweep.search.space == "qlora"
    assert sweep.base_dir == tmp_path.resolve()
    assert sweep.resolve_path("train.jsonl") == tmp_path.resolve() / "train.jsonl"


# --- defaults and round trips ------------------------------------------------------------------


def test_experiment_defaults_to_sweep_name(tmp_path, minimal):
    assert load_sweep(write_sweep(tmp_path, minimal)).tracking.experiment == "mini"


def test_explicit_experiment_is_kept(tmp_path, minimal):
    minimal["tracking"] = {"experiment": "shared-board"}
    assert load_sweep(write_sweep(tmp_path, minimal)).tracking.experiment == "shared-board"


def test_experiment_default_does_not_leak_between_sweeps(minimal):
    first = SweepConfig(**minimal)
    second = SweepConfig(**{**minimal, "name": "other"})
    assert (first.tracking.experiment, second.tracking.experiment) == ("mini", "other")


def test_trial_holds_only_trial_fields_and_round_trips():
    sweep = load_sweep(QUICKSTART)
    trial = sweep.trial()
    assert type(trial) is TrialConfig
    assert set(trial.model_dump()) == set(TrialConfig.model_fields)
    assert trial.lora == sweep.lora and trial.data == sweep.data and trial.training == sweep.training
    # Through python and through JSON-mode dumps.
    assert TrialConfig(**trial.model_dump()) == trial
    assert TrialConfig.model_validate_json(trial.model_dump_json()) == trial


def test_trial_written_back_is_a_valid_single_trial_sweep(tmp_path):
    """`qsweep show` writes a trial back out as a sweep file: it must load and give the same trial."""
    trial = load_sweep(QUICKSTART).trial()
    text = dump_yaml({"name": "one-trial", **trial.model_dump(mode="json"), "search": {"space": None}})
    reloaded = load_sweep(write_sweep(tmp_path, text))
    assert reloaded.trial() == trial
    assert reloaded.search.space is None


def test_trial_is_independent_of_the_sweep():
    sweep = load_sweep(QUICKSTART)
    trial = sweep.trial()
    trial.lora.r = 64
    assert sweep.lora.r == 16


# --- mistakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, extra, field",
    [
        ("lora", {"rank": 8}, "lora.rank"),
        ("training", {"learning_rte": 1e-3}, "training.learning_rte"),
        ("search", {"asha": {"grace": 3}}, "search.asha.grace"),
        (None, {"epochs": 3}, "epochs"),
    ],
)
def test_unknown_key_is_rejected_naming_the_dotted_field(tmp_path, minimal, section, extra, field):
    if section is None:
        minimal.update(extra)
    else:
        minimal[section] = extra
    problems = problems_of(write_sweep(tmp_path, minimal))
    assert len(problems) == 1
    assert problems[0].startswith(f"{field}: unknown key")
    assert "spelling" in problems[0]


@pytest.mark.parametrize(
    "section, values, field, got",
    [
        ("lora", {"r": 0}, "lora.r", 0),
        ("lora", {"dropout": 1}, "lora.dropout", 1),
        ("lora", {"dropout": -0.1}, "lora.dropout", -0.1),
        ("quantization", {"quant_type": "int8"}, "quantization.quant_type", "int8"),
        ("training", {"learning_rate": -1e-4}, "training.learning_rate", -1e-4),
        ("training", {"learning_rate": 0}, "training.learning_rate", 0),
        ("training", {"lr_scheduler": "exponential"}, "training.lr_scheduler", "exponential"),
        ("search", {"direction": "up"}, "search.direction", "up"),
        ("search", {"asha": {"reduction_factor": 1}}, "search.asha.reduction_factor", 1),
        ("data", {"train": "t.jsonl", "max_seq_length": 4}, "data.max_seq_length", 4),
        ("evaluation", {"tasks": []}, "evaluation.tasks", []),
    ],
)
def test_wrong_value_names_the_field_and_the_value(tmp_path, minimal, section, values, field, got):
    minimal[section] = values
    problems = problems_of(write_sweep(tmp_path, minimal))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field}: ")
    assert f"(got {got!r})" in problems[0]


def test_bad_sweep_name_is_reported(tmp_path, minimal):
    minimal["name"] = "my sweep"
    problems = problems_of(write_sweep(tmp_path, minimal))
    assert len(problems) == 1 and problems[0].startswith("name: ")


def test_missing_required_fields_are_reported(tmp_path):
    problems = problems_of(write_sweep(tmp_path, {"lora": {"r": 8}}))
    assert sorted(problems) == ["data: required; add it", "name: required; add it"]


def test_missing_nested_required_field(tmp_path):
    problems = problems_of(write_sweep(tmp_path, {"name": "x", "data": {"prompt": "{q}"}}))
    assert problems == ["data.train: required; add it"]


def test_all_problems_are_reported_at_once(tmp_path, minimal):
    minimal["lora"] = {"r": 0, "dropout": 1.5}
    minimal["quantization"] = {"quant_type": "int8"}
    problems = problems_of(write_sweep(tmp_path, minimal))
    assert len(problems) == 3
    assert sorted(p.split(":")[0] for p in problems) == ["lora.dropout", "lora.r", "quantization.quant_type"]


def test_all_kinds_of_problem_reported_together(tmp_path):
    data = {"name": "x", "lora": {"rank": 8}, "training": {"learning_rate": -1}}
    problems = problems_of(write_sweep(tmp_path, data))
    assert sorted(p.split(":")[0] for p in problems) == ["data", "lora.rank", "training.learning_rate"]


def test_one_mistake_in_a_union_field_is_one_problem_naming_the_field(tmp_path, minimal):
    minimal["resources"] = {"gpus_per_trial": "lots"}
    problems = problems_of(write_sweep(tmp_path, minimal))
    assert len(problems) == 1, problems
    assert problems[0].startswith("resources.gpus_per_trial: ")


def test_invalid_yaml_reports_line_and_column(tmp_path):
    path = write_sweep(tmp_path, "name: x\ndata:\n  train: a: b\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith("line 3, column ")
    assert "invalid YAML" in problems[0]


def test_invalid_yaml_unclosed_bracket_names_a_line(tmp_path):
    path = write_sweep(tmp_path, "name: x\nevaluation:\n  tasks: [zorble\nlora:\n  r: 8\n")
    (problem,) = problems_of(path)
    assert problem.startswith("line ") and "invalid YAML" in problem


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_file_that_is_not_a_mapping(tmp_path, text):
    (problem,) = problems_of(write_sweep(tmp_path, text))
    assert "mapping" in problem


def test_missing_file_is_a_sweep_file_error(tmp_path):
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert problem.startswith("cannot read the file")
