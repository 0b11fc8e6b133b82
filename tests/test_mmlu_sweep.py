"""A quickstart-like sweep with the offline MMLU as a second task, the hub unreachable: real Ray,
Optuna, bitsandbytes 4-bit, peft, lm-eval and MLflow on the tiny model."""

from __future__ import annotations

import copy
import json

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


def test_trials_log_mmlu_its_categories_and_delta_vs_base(mmlu_sweep):
    (parent,) = _runs(mmlu_sweep["uri"], "sweep")
    trials = _runs(mmlu_sweep["uri"], "trial")
    assert len(trials) == 2
    for run in trials:
        metrics = run.data.metrics
        # The untuned base in the trial's own 4-bit type.
        base = parent.data.metrics[f"baseline/{run.data.params['quantization.quant_type']}/{mmlu.GROUP}/acc"]
        for name in (mmlu.GROUP, *(f"{mmlu.GROUP}_{c}" for c in CATEGORIES)):
            assert 0.0 <= metrics[f"{name}/acc"] <= 1.0, name
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
