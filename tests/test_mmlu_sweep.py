"""A quickstart-like sweep with the offline MMLU as a second task, the hub unreachable: real Ray,
Optuna, bitsandbytes 4-bit, peft, lm-eval and MLflow on the tiny model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qsweep.cli import app
from qsweep.config.paths import shipped
from qsweep.evaluate import mmlu
from qsweep.tracking import client

pytestmark = pytest.mark.slow

CATEGORIES = ("stem", "humanities", "social_sciences", "other")


@pytest.fixture(scope="module")
def mmlu_sweep(tmp_path_factory, tiny_sweep_base) -> dict:
    assert mmlu.data_problem() is None  # fetched (PyPI) before the hub goes away
    workdir = tmp_path_factory.mktemp("mmlu")
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["tracking"] = {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": "mmlu-guard"}
    sweep["output_dir"] = str(workdir / "runs")
    sweep["search"] = {**sweep["search"], "num_trials": 2, "asha": {"enabled": False}}
    sweep["evaluation"] = {"tasks": ["zorble", mmlu.GROUP], "limit": 8, "per_subject": 1,
                           "final": {"top_k": 1, "per_subject": 1}}
    path = workdir / "guard.yaml"
    path.write_text(yaml.safe_dump(sweep))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
        result = CliRunner().invoke(app, ["run", str(path)], catch_exceptions=False)
    return {"result": result, "uri": sweep["tracking"]["uri"], "workdir": workdir}


def _runs(uri: str, kind: str) -> list:
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name("mmlu-guard")
    return mlflow_client.search_runs([experiment.experiment_id], filter_string=f"tags.`qsweep.kind` = '{kind}'")


def test_sweep_runs_offline_and_ranks_by_zorble(mmlu_sweep):
    result = mmlu_sweep["result"]
    assert result.exit_code == 0, result.output
    assert "finished 2, stopped early 0, failed 0" in result.output
    (parent,) = _runs(mmlu_sweep["uri"], "sweep")
    assert parent.data.tags["qsweep.metric"] == "zorble/acc"


def _lm_eval_categories() -> dict[str, str]:
    """subject -> category, read from lm-eval's own mmlu YAMLs (each subject's `tag`)."""
    import lm_eval

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    tags = {config["dataset_name"]: config["tag"] for config in map(yaml.safe_load, map(Path.read_text,
                                                                                          folder.glob("mmlu_*.yaml")))}
    return {subject: tag.removeprefix("mmlu_").removesuffix("_tasks") for subject, tag in tags.items()}


def _recomputed_from_samples(run_id: str, uri: str) -> dict[str, float]:
    """lm-eval's size-weighted group means, recomputed from the trial's logged per-item samples: a
    category's accuracy is the mean over every item of its subjects, the group's over all items."""
    local = client(uri).download_artifacts(run_id, "lm_eval_samples.jsonl")
    samples = [json.loads(line) for line in Path(local).read_text().splitlines()]
    category = _lm_eval_categories()
    items: dict[str, list[float]] = {}
    for sample in samples:
        subject = sample["task"].removeprefix(f"{mmlu.GROUP}_")
        if sample["task"].startswith(f"{mmlu.GROUP}_") and subject in category:
            items.setdefault(f"{mmlu.GROUP}_{category[subject]}", []).append(sample["acc"])
            items.setdefault(mmlu.GROUP, []).append(sample["acc"])
    assert len(items[mmlu.GROUP]) == 57  # one question per subject
    return {name: sum(values) / len(values) for name, values in items.items()}


def test_trials_log_mmlu_its_categories_and_delta_vs_base(mmlu_sweep):
    (parent,) = _runs(mmlu_sweep["uri"], "sweep")
    trials = _runs(mmlu_sweep["uri"], "trial")
    assert len(trials) == 2
    for run in trials:
        metrics = run.data.metrics
        # The untuned base in the trial's own 4-bit type.
        base = parent.data.metrics[f"baseline/{run.data.params['quantization.quant_type']}/{mmlu.GROUP}/acc"]
        expected = _recomputed_from_samples(run.info.run_id, mmlu_sweep["uri"])
        assert sorted(expected) == sorted([mmlu.GROUP, *(f"{mmlu.GROUP}_{c}" for c in CATEGORIES)])
        assert {name: metrics[f"{name}/acc"] for name in expected} == pytest.approx(expected, abs=1e-9)
        assert metrics[f"delta/{mmlu.GROUP}/acc"] == pytest.approx(metrics[f"{mmlu.GROUP}/acc"] - base)
        # 57 subjects, one question each: the group's accuracy is a multiple of 1/57.
        assert round(metrics[f"{mmlu.GROUP}/acc"] * 57, 6) == round(metrics[f"{mmlu.GROUP}/acc"] * 57)


def test_every_trial_scores_the_same_stratified_items(mmlu_sweep):
    files = sorted(mmlu_sweep["workdir"].glob("runs/**/lm_eval_results.json"))
    items = [json.loads(f.read_text())["items"] for f in files]
    assert len(items) == 2
    subjects = [f"{mmlu.GROUP}_{s}" for s in mmlu.subjects()]
    assert all(len(items[0][s]) == 1 for s in subjects) and len(items[0]["zorble"]) == 8
    assert items[0] == items[1]


def test_leaderboard_shows_mmlu_beside_the_ranked_score(mmlu_sweep):
    result = CliRunner().invoke(app, ["leaderboard", "--tracking-uri", mmlu_sweep["uri"], "--experiment",
                                      "mmlu-guard", "--format", "json"])
    assert result.exit_code == 0, result.output
    board = json.loads(result.output)
    assert board["metric"] == "zorble/acc" and board["mmlu"] == mmlu.GROUP
    trials = {r.info.run_id: r.data.metrics for r in _runs(mmlu_sweep["uri"], "trial")}
    assert len(board["rows"]) == len(trials) == 2
    for row in board["rows"]:
        metrics = trials[row["run_id"]]
        assert row["mmlu"] == metrics[f"{mmlu.GROUP}/acc"]
        assert row["mmlu_delta"] == metrics[f"delta/{mmlu.GROUP}/acc"]
        assert row["mmlu_stem"] == metrics[f"{mmlu.GROUP}_stem/acc"]
        assert row["mmlu_hum"] == metrics[f"{mmlu.GROUP}_humanities/acc"]


def test_shipped_mmlu_sweep_validates_without_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    result = CliRunner().invoke(app, ["validate", str(shipped("sweeps") / "mmlu.yaml")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
