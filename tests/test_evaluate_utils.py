"""evaluate.flatten_scores, local lm-eval task discovery, and what scoring does once per process."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsweep.evaluate import mmlu
from qsweep.evaluate.harness import flatten_scores, include_dirs, local_tasks, task_specs

REPO = Path(__file__).resolve().parent.parent


# --- flatten_scores --------------------------------------------------------------------------------


def test_flatten_scores_lm_eval_results():
    results = {
        "zorble": {"alias": "zorble", "acc,none": 0.75, "acc_stderr,none": 0.05},
        "hellaswag": {"acc,none": 0.3, "acc_stderr,none": "N/A", "acc_norm,none": 0.32, "acc_norm_stderr,none": 0.01},
    }
    assert flatten_scores(results) == {
        "zorble/acc": 0.75,
        "zorble/acc_stderr": 0.05,
        "hellaswag/acc": 0.3,
        "hellaswag/acc_norm": 0.32,
        "hellaswag/acc_norm_stderr": 0.01,
    }


def test_flatten_scores_keeps_filter_names():
    results = {
        "gsm8k": {
            "exact_match,strict-match": 0.25,
            "exact_match,flexible-extract": 0.5,
            "exact_match_stderr,flexible-extract": "N/A",
        }
    }
    assert flatten_scores(results) == {
        "gsm8k/exact_match_strict-match": 0.25,
        "gsm8k/exact_match_flexible-extract": 0.5,
    }


@pytest.mark.parametrize("value", ["N/A", None, float("nan"), float("inf"), True, [0.5], "0.5"])
def test_flatten_scores_drops_non_numbers(value):
    assert flatten_scores({"t": {"acc,none": value, "f1,none": 1}}) == {"t/f1": 1.0}


def test_flatten_scores_gives_floats_and_mlflow_safe_names():
    scores = flatten_scores({"t": {"acc,none": 1, "samples": 10, "name": "t"}})
    assert scores == {"t/acc": 1.0}
    assert type(scores["t/acc"]) is float
    assert not any("," in k for k in scores)


def test_flatten_scores_empty():
    assert flatten_scores({}) == {}
    assert flatten_scores({"t": {}}) == {}


def test_stderr_of_a_filtered_metric_is_where_the_leaderboard_looks():
    scores = flatten_scores({"gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.04}})
    metric = "gsm8k/exact_match_strict-match"
    assert metric in scores
    assert scores.get(f"{metric}_stderr") == 0.04  # leaderboard._row: metrics.get(f"{metric}_stderr")


# --- local tasks -----------------------------------------------------------------------------------


def test_include_dirs_puts_the_shipped_tasks_first(tmp_path):
    dirs = include_dirs(["extra", str(tmp_path / "abs")], tmp_path)
    assert dirs[0] == REPO / "evaluation" / "tasks"
    assert dirs[1] == mmlu.task_folder()  # the generated offline MMLU YAMLs
    assert dirs[2:] == [(tmp_path / "extra").resolve(), tmp_path / "abs"]


def test_local_tasks_find_the_shipped_zorble_task(zorble_dir):
    found = local_tasks(include_dirs([], REPO))
    assert found["zorble"] == zorble_dir / "zorble.yaml"


def test_task_specs_resolve_zorble_data_files_to_absolute_existing_paths():
    specs = task_specs(["zorble"], include_dirs([], Path("/nonexistent")))
    (spec,) = specs
    assert isinstance(spec, dict)
    assert spec["task"] == "zorble"
    assert spec["output_type"] == "multiple_choice"
    files = spec["dataset_kwargs"]["data_files"]
    assert set(files) == {"test"}
    path = Path(files["test"])
    assert path.is_absolute() and path.exists()
    assert path == REPO / "evaluation" / "tasks" / "zorble" / "test.jsonl"


def test_task_specs_pass_builtin_names_through():
    specs = task_specs(["hellaswag", "zorble", "arc_easy"], include_dirs([], REPO))
    assert specs[0] == "hellaswag" and specs[2] == "arc_easy"
    assert isinstance(specs[1], dict) and specs[1]["task"] == "zorble"


def _write_task(folder: Path, name: str, data_files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text('{"q": "a", "label": 0}\n')
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:{data_files}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: ['x', 'y']\ndoc_to_target: label\n"
    )


def test_include_path_tasks_are_found_and_resolved_against_their_yaml(tmp_path):
    _write_task(tmp_path / "mytasks" / "sub", "mytask", "\n    test: rows.jsonl")
    (tmp_path / "mytasks" / "notes.yaml").write_text("just: notes\n")
    (tmp_path / "mytasks" / "broken.yaml").write_text("task: [oops\n")
    dirs = include_dirs(["mytasks"], tmp_path)
    found = local_tasks(dirs)
    assert set(found) - mmlu.task_names() == {"zorble", "blick", "mytask"}
    (spec,) = task_specs(["mytask"], dirs)
    assert spec["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "mytasks" / "sub" / "rows.jsonl")}


def test_absolute_data_files_are_kept(tmp_path):
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("{}\n")
    _write_task(tmp_path / "t", "abs_task", f"\n    test: {target}")
    (spec,) = task_specs(["abs_task"], include_dirs([str(tmp_path / "t")], tmp_path))
    assert spec["dataset_kwargs"]["data_files"] == {"test": str(target)}


def test_string_data_files_are_resolved_against_the_yaml(tmp_path):
    _write_task(tmp_path / "t", "str_task", " rows.jsonl")
    (spec,) = task_specs(["str_task"], include_dirs([str(tmp_path / "t")], tmp_path))
    assert spec["dataset_kwargs"]["data_files"] == str(tmp_path / "t" / "rows.jsonl")


def test_the_shipped_groups_for_hub_users_are_known_to_lm_eval():
    from qsweep.evaluate.harness import builtin_task_names, task_manager

    assert {"qsweep_reasoning", "qsweep_knowledge"} <= builtin_task_names()
    manager = task_manager(True)
    for group in ("qsweep_reasoning", "qsweep_knowledge"):
        entry = manager.task_index[group]
        assert entry.kind.name == "GROUP", group
        # lm-eval resolves every member: a typo in a task name would fail only on a hub machine.
        assert entry.cfg["task"] and [t for t in entry.cfg["task"] if t not in manager.task_index] == [], group


def test_the_weighted_objective_is_computed_as_documented():
    from qsweep.config.schema import SearchConfig
    from qsweep.search.objective import objective_value

    search = SearchConfig(weights={"mmlu": 0.7, "arc_easy": 0.3})
    assert search.metric == "objective" and search.weights == {"mmlu/acc": 0.7, "arc_easy/acc": 0.3}
    assert objective_value({"mmlu/acc": 0.5, "arc_easy/acc": 0.8}, search) == pytest.approx(0.7 * 0.5 + 0.3 * 0.8)
    lower_is_better = SearchConfig(weights={"a/acc": 1.0, "b/word_perplexity": -0.5})
    assert objective_value({"a/acc": 0.6, "b/word_perplexity": 20.0}, lower_is_better) == pytest.approx(
        (0.6 - 0.5 * 20.0) / 1.5)
    with pytest.raises(KeyError, match="search.weights"):
        objective_value({"mmlu/acc": 0.5}, search)


def test_the_environment_report_is_built_once_a_process(tiny_llama):
    """lm-eval puts torch's environment report (a `pip list` in a subprocess) into every result: the
    second scoring in a process gets the same report without building it again."""
    from torch.utils import collect_env

    from qsweep.config.schema import EvaluationConfig, QuantizationConfig
    from qsweep.evaluate.harness import score
    from qsweep.train.trial import load_base

    model, tokenizer = load_base(tiny_llama, QuantizationConfig())
    evaluation = EvaluationConfig(tasks=["zorble"], limit=4)
    first = score(model, tokenizer, evaluation, REPO, QuantizationConfig())
    built = collect_env.get_pretty_env_info.cache_info()
    second = score(model, tokenizer, evaluation, REPO, QuantizationConfig())
    assert "PyTorch version" in second.raw["pretty_env_info"]
    assert second.raw["pretty_env_info"] == first.raw["pretty_env_info"]
    assert collect_env.get_pretty_env_info.cache_info().misses == built.misses
    assert collect_env.get_pretty_env_info.cache_info().hits == built.hits + 1
    assert second.scores == first.scores
