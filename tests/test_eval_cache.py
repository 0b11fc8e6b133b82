"""The evaluation cache: its key, its files, and a second sweep reusing the untuned base's score."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from qsweep.config.schema import EvaluationConfig, QuantizationConfig
from qsweep.evaluate import cache

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
"""


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    """A local task, and a group of three subtasks built from one template and one shared data file."""
    folder = tmp_path / "tasks"
    (folder / "single").mkdir(parents=True)
    (folder / "single" / "data.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "label": 0}\n')
    (folder / "single" / "single.yaml").write_text(TASK_YAML.format(name="single", data="data.jsonl"))
    group = folder / "quiz"
    group.mkdir()
    (group / "all.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "label": 1, "subject": "x"}\n')
    (group / "_template.yaml").write_text("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: all.jsonl\n"
                                          "process_docs: !function utils.keep_subject\n")
    (group / "utils.py").write_text("def keep_subject(docs):\n    return docs\n")
    for subject in ("algebra", "biology", "chemistry"):
        (group / f"quiz_{subject}.yaml").write_text(f"include: _template.yaml\ntask: quiz_{subject}\n")
    (group / "_quiz.yaml").write_text("group: quiz\ntask:\n  - quiz_algebra\n  - quiz_biology\n  - quiz_chemistry\n")
    return folder


def _key(folder: Path, **change) -> str:
    quant = QuantizationConfig(**change.get("quant", {}))
    evaluation = EvaluationConfig(**{"tasks": ["single", "quiz"], "limit": 8, **change.get("evaluation", {})})
    return cache.cache_key(cache.baseline_ingredients(change.get("model_hash", "m" * 64), quant,
                                                      change.get("dtype", "bfloat16"), evaluation, [folder],
                                                      change.get("scoring_dtype", "bfloat16")))


def test_the_key_is_stable_and_changes_with_every_ingredient(tasks: Path):
    reference = _key(tasks)
    assert _key(tasks) == reference
    variants = {
        "model weights": _key(tasks, model_hash="n" * 64),
        "quant type": _key(tasks, quant={"quant_type": "fp4"}),
        "double quant": _key(tasks, quant={"double_quant": False}),
        "compute dtype": _key(tasks, dtype="float32"),
        "scoring dtype": _key(tasks, scoring_dtype="float32"),
        "limit": _key(tasks, evaluation={"limit": 9}),
        "no limit": _key(tasks, evaluation={"limit": None}),
        "subset seed": _key(tasks, evaluation={"subset_seed": 1}),
        "few-shot": _key(tasks, evaluation={"num_fewshot": 2}),
        "tasks": _key(tasks, evaluation={"tasks": ["single"]}),
    }
    edits = {
        "task yaml": (tasks / "single" / "single.yaml", "metadata: {version: 2}\n"),
        "task data": (tasks / "single" / "data.jsonl", '{"question": "r", "choices": ["a", "b"], "label": 1}\n'),
        "group member yaml": (tasks / "quiz" / "quiz_biology.yaml", "num_fewshot: 0\n"),
        "group template": (tasks / "quiz" / "_template.yaml", "doc_to_target: label\n"),
        "group code": (tasks / "quiz" / "utils.py", "# changed\n"),
        "group's shared data": (tasks / "quiz" / "all.jsonl", '{"question": "s", "choices": ["a"], "label": 0}\n'),
    }
    for name, (path, extra) in edits.items():
        original = path.read_text()
        path.write_text(original + extra)
        variants[name] = _key(tasks)
        path.write_text(original)
        assert _key(tasks) == reference, f"restoring {name} restores the key"
    assert reference not in variants.values()
    assert len(set(variants.values())) == len(variants), variants


def test_a_group_hashes_every_member_and_its_shared_data_once(tasks: Path, monkeypatch):
    read: list[Path] = []
    digest = cache._file_digest.__wrapped__

    def counting(path, size, mtime_ns):
        read.append(path)
        return digest(path, size, mtime_ns)

    monkeypatch.setattr(cache, "_file_digest", counting)
    cache.task_content_hash("quiz", [tasks])
    names = sorted(p.name for p in read)
    assert names.count("all.jsonl") == 1
    assert {"_quiz.yaml", "quiz_algebra.yaml", "quiz_biology.yaml", "quiz_chemistry.yaml", "_template.yaml",
            "utils.py", "all.jsonl"} <= set(names)
    assert "single.yaml" not in names


def test_a_builtin_task_is_keyed_by_name_and_lm_eval_version(tasks: Path):
    from importlib.metadata import version

    assert cache.task_content_hash("arc_easy", [tasks]) != cache.task_content_hash("arc_challenge", [tasks])
    ingredients = cache.baseline_ingredients("m", QuantizationConfig(), "float32",
                                             EvaluationConfig(tasks=["arc_easy"]), [tasks], "float32")
    assert ingredients["lm_eval"] == version("lm_eval")


def test_entries_round_trip_and_a_corrupt_one_is_ignored(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path))
    scores = {"zorble/acc": 0.25, "zorble/acc_stderr": 0.1}
    path = cache.store("k1", {"model_hash": "m"}, scores, {"zorble": [1, 5, 9]})
    assert path.parent == tmp_path / "evaluations"
    assert cache.load("k1")["scores"] == scores
    assert cache.load("absent") is None
    assert not list(path.parent.glob("*.tmp")), "no temporary file is left behind"
    for garbage in ("{not json", json.dumps({"key": "k1", "scores": {"zorble/acc": "high"}}),
                    json.dumps({"key": "other", "scores": scores}), json.dumps([1, 2]), ""):
        path.write_text(garbage)
        with caplog.at_level(logging.WARNING, logger="qsweep.evaluate.cache"):
            assert cache.load("k1") is None
        assert "ignoring the unreadable evaluation cache entry" in caplog.text
    cache.store("k1", {"model_hash": "m"}, scores, None)
    assert cache.load("k1")["scores"] == scores


@pytest.mark.slow
def test_a_second_sweep_reuses_the_cached_baseline(tmp_path: Path, monkeypatch, tiny_sweep_base):
    """Two sweeps asking the same question: the second one takes the base's score from the cache,
    says so in its log and on its parent run, and logs the same score."""
    from typer.testing import CliRunner

    from qsweep.cli import app
    from qsweep.tracking import client
    from qsweep.tracking.state import SWEEP_LOG

    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path / "cache"))
    parents = []
    for name in ("first", "second"):
        sweep = copy.deepcopy(tiny_sweep_base)
        sweep["name"] = name
        sweep["tracking"] = {"uri": f"sqlite:///{tmp_path}/{name}.db", "experiment": name}
        sweep["output_dir"] = str(tmp_path / "runs" / name)
        sweep["search"] = {**sweep["search"], "num_trials": 1, "asha": {"enabled": False},
                           "baselines": [{"quantization.quant_type": "nf4", "lora.r": 4}]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sweep))
        result = CliRunner().invoke(app, ["run", str(path)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        mlflow_client = client(sweep["tracking"]["uri"])
        experiment = mlflow_client.get_experiment_by_name(name)
        parent = mlflow_client.search_runs([experiment.experiment_id], filter_string="tags.`qsweep.kind` = 'sweep'")[0]
        # qsweep's own log goes to the sweep's log file, beside Ray's and the libraries' output.
        parents.append((parent, (Path(sweep["output_dir"]) / name / SWEEP_LOG).read_text()))

    (first, first_log), (second, second_log) = parents
    assert first.data.tags["qsweep.baseline_cache.nf4"].startswith("stored ")
    assert "reused from the evaluation cache" not in first_log
    # nf4 was scored by the trial on the base it had loaded; fp4 (in the space, never run) by a task.
    assert re.search(r"baseline nf4 scored in [\d.]+ s \(by a trial\)", first_log), first_log
    assert re.search(r"baseline fp4 scored in [\d.]+ s \(in a separate task\)", first_log), first_log
    assert second.data.tags["qsweep.baseline_cache.fp4"].startswith("reused ")
    key = first.data.tags["qsweep.baseline_cache.nf4"].split()[1]
    assert second.data.tags["qsweep.baseline_cache.nf4"] == f"reused {key}"
    assert f"baseline nf4 zorble: reused from the evaluation cache (key {key})" in second_log
    assert "baseline_seconds/nf4" in first.data.metrics and "baseline_seconds/nf4" not in second.data.metrics
    baseline = {k: v for k, v in first.data.metrics.items() if k.startswith("baseline/")}
    assert baseline and {k: second.data.metrics[k] for k in baseline} == baseline
    entry = json.loads((tmp_path / "cache" / "evaluations" / f"{key}.json").read_text())
    assert entry["scores"]["zorble/acc"] == first.data.metrics["baseline/nf4/zorble/acc"]
    assert len(entry["items"]["zorble"]) == tiny_sweep_base["evaluation"]["limit"]

    # The trial's in-process score of its base matches the base scored alone, in its own process.
    from qsweep.config.schema import SweepConfig
    from qsweep.orchestrate.stages import baseline_trial, score_baseline

    alone = score_baseline(baseline_trial(SweepConfig(**tiny_sweep_base), "nf4").model_dump(mode="json"),
                           str(tmp_path), 1)
    assert alone["scores"]["zorble/acc"] == first.data.metrics["baseline/nf4/zorble/acc"]
    assert alone["items"] == entry["items"]
