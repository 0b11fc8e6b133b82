"""A real 2-trial sweep: Ray Tune + Optuna, bitsandbytes 4-bit, peft, Trainer, lm-eval, MLflow."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from sweep_bench import SweepBench
from typer.testing import CliRunner

from qsweep.cli import app

pytestmark = pytest.mark.slow

CHEAP_ITEMS, FINAL_ITEMS = 8, 20


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_sweep_base, sweep_bench) -> dict:
    workdir = tmp_path_factory.mktemp("sweep")
    sweep = copy.deepcopy(tiny_sweep_base)
    # Both 4-bit types tried, ASHA off so both trials finish whatever their losses.
    sweep["search"] = {
        **sweep["search"],
        "num_trials": 2,
        "asha": {"enabled": False},
        "baselines": [
            {"quantization.quant_type": "nf4", "lora.target_modules": "all-linear", "lora.r": 8},
            {"quantization.quant_type": "fp4", "lora.target_modules": "attention", "lora.r": 4},
        ],
    }
    # Scored on a seeded 8 items during the search, then both re-scored on 20 (of 38) at the end.
    sweep["evaluation"]["limit"] = CHEAP_ITEMS
    sweep["evaluation"]["final"] = {"top_k": 2, "limit": FINAL_ITEMS}
    path = sweep_bench.write(workdir, sweep, experiment="e2e", name="tiny.yaml")
    result = sweep_bench.invoke("run", path)
    return {"result": result, "uri": sweep["tracking"]["uri"], "workdir": workdir}


def _trial_runs(uri: str) -> list:
    runs = SweepBench.runs(uri, "e2e")
    assert runs, f"no trial run in {uri}: every check over them would pass on nothing"
    return runs


def test_sweep_finishes_and_prints_leaderboard(finished_sweep):
    result = finished_sweep["result"]
    assert result.exit_code == 0, result.output
    assert "finished 2, stopped early 0, failed 0" in result.output
    assert "untuned base model: zorble/acc" in result.output
    assert "mlflow ui --backend-store-uri" in result.output


def test_every_child_run_carries_the_full_config(finished_sweep):
    runs = _trial_runs(finished_sweep["uri"])
    assert len(runs) == 2
    assert {r.data.params["quantization.quant_type"] for r in runs} == {"nf4", "fp4"}
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"]
        for key in ("model.name", "provenance.model_hash", "provenance.data_hash", "quantization.double_quant",
                    "provenance.compute_dtype", "provenance.scoring_dtype", "lora.r", "lora.alpha", "lora.dropout",
                    "provenance.target_modules_resolved", "training.learning_rate", "training.lr_scheduler",
                    "training.max_steps", "training.batch_size", "training.seed", "provenance.versions.torch",
                    "provenance.versions.transformers", "provenance.versions.peft",
                    "provenance.versions.bitsandbytes", "provenance.versions.lm_eval"):
            assert params.get(key) not in (None, ""), key
        assert len(params["provenance.model_hash"]) == 64
        # Scored in the dtype it computes in (config.policy.scoring_dtype), whatever the machine.
        assert params["provenance.scoring_dtype"] == params["provenance.compute_dtype"]
        for key in ("zorble/acc", "zorble/acc_stderr", "peak_memory_mb", "tokens_per_second", "train_seconds",
                    "wall_seconds", "eval_loss"):
            assert key in metrics, key
        assert metrics["peak_memory_mb"] > 0 and metrics["tokens_per_second"] > 0


def test_artifacts_and_loss_curve_are_logged(finished_sweep):
    from qsweep.tracking import client

    mlflow_client = client(finished_sweep["uri"])
    for run in _trial_runs(finished_sweep["uri"]):
        names = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "adapter", "lm_eval_results.json", "lm_eval_samples.jsonl"} <= names
        adapter = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in adapter
        curve = mlflow_client.get_metric_history(run.info.run_id, "eval_loss")
        assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [5, 10]


def test_parent_run_has_the_baseline(finished_sweep):
    (parent,) = SweepBench.runs(finished_sweep["uri"], "e2e", "sweep")
    assert "baseline/zorble/acc" in parent.data.metrics
    assert parent.data.metrics["trials_finished"] == 2


def test_leaderboard_json_is_ranked(finished_sweep):
    result = CliRunner().invoke(
        app, ["leaderboard", "--tracking-uri", finished_sweep["uri"], "--experiment", "e2e", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    board = json.loads(result.output)
    scores = [row["zorble/acc"] for row in board["rows"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)


def test_reloaded_adapter_reproduces_the_logged_score(finished_sweep):
    from qsweep.evaluate.harness import score
    from qsweep.report.replay import fetch_logged_trial, load_trained

    for run in _trial_runs(finished_sweep["uri"]):
        logged = fetch_logged_trial(finished_sweep["uri"], run.info.run_id)
        model, tokenizer = load_trained(logged.trial, logged.adapter_dir, Path("."))
        scores = score(model, tokenizer, logged.trial.evaluation, Path("."), logged.trial.quantization).scores
        assert scores["zorble/acc"] == pytest.approx(run.data.metrics["zorble/acc"], abs=1e-9)


def test_reproduce_command_rescores_a_run_to_its_logged_score(finished_sweep):
    """`qsweep reproduce` as a user runs it: the adapter reloaded from MLflow onto its logged base
    re-scores to the score MLflow holds for the run (8 items: exact at the 4 decimals printed)."""
    run = _trial_runs(finished_sweep["uri"])[0]
    result = CliRunner().invoke(app, ["reproduce", run.info.run_id, "--tracking-uri", finished_sweep["uri"]])
    assert result.exit_code == 0, result.output
    rows = {cells[0]: cells[1:] for line in result.output.splitlines()
            if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 3}
    logged = f"{run.data.metrics['zorble/acc']:.4f}"
    assert rows["zorble/acc"] == [logged, logged], result.output


def _best_run_id(finished_sweep) -> str:
    runs = sorted(_trial_runs(finished_sweep["uri"]), key=lambda r: -r.data.metrics["zorble/acc"])
    return runs[0].info.run_id


def test_show_prints_a_sweep_file_that_validates_and_names_the_config(finished_sweep, tmp_path):
    run_id = _best_run_id(finished_sweep)
    result = CliRunner().invoke(app, ["show", run_id, "--tracking-uri", finished_sweep["uri"]])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    logged = [r for r in _trial_runs(finished_sweep["uri"]) if r.info.run_id == run_id][0]
    assert shown["lora"]["r"] == int(logged.data.params["lora.r"])
    assert shown["quantization"]["quant_type"] == logged.data.params["quantization.quant_type"]
    assert shown["search"]["num_trials"] == 1 and shown["search"]["space"] is None
    assert f"zorble/acc = {logged.data.metrics['zorble/acc']:.6g}" in result.output
    path = tmp_path / "rerun.yaml"
    path.write_text(result.output)
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0


def test_promote_then_load_by_alias_gives_the_same_adapter(finished_sweep, tmp_path):
    import hashlib

    import mlflow

    run_id = _best_run_id(finished_sweep)
    result = CliRunner().invoke(app, ["promote", run_id, "--alias", "production",
                                      "--tracking-uri", finished_sweep["uri"]])
    assert result.exit_code == 0, result.output
    name = result.output.split("models:/")[1].split("@")[0]
    mlflow.set_tracking_uri(finished_sweep["uri"])
    from_registry = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@production", dst_path=str(tmp_path / "r")))
    from_run = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter",
                                                        dst_path=str(tmp_path / "a")))

    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}

    assert digest(from_registry) == digest(from_run)
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "production")
    assert version.run_id == run_id
    logged = [r for r in _trial_runs(finished_sweep["uri"]) if r.info.run_id == run_id][0]
    assert version.tags["quant_type"] == logged.data.params["quantization.quant_type"]
    assert version.tags["base_model_hash"] == logged.data.params["provenance.model_hash"]
    assert float(version.tags["score.zorble/acc"]) == pytest.approx(
        [r for r in _trial_runs(finished_sweep["uri"]) if r.info.run_id == run_id][0].data.metrics["zorble/acc"],
        abs=1e-5)
    reserved = CliRunner().invoke(app, ["promote", run_id, "--alias", "latest", "--tracking-uri", finished_sweep["uri"]])
    assert reserved.exit_code == 2


def test_export_scores_the_same_under_lm_evals_own_cli(finished_sweep, tmp_path):
    import subprocess
    import sys

    run_id = _best_run_id(finished_sweep)
    dest = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", run_id, str(dest), "--tracking-uri", finished_sweep["uri"]])
    assert result.exit_code == 0, result.output
    assert {"base", "adapter", "tasks", "README.md", "config.yaml"} <= {p.name for p in dest.iterdir()}
    assert CliRunner().invoke(app, ["export", run_id, str(dest), "--tracking-uri", finished_sweep["uri"]]).exit_code == 2
    logged = [r for r in _trial_runs(finished_sweep["uri"]) if r.info.run_id == run_id][0]
    from qsweep.tracking import client

    results_file = client(finished_sweep["uri"]).download_artifacts(run_id, "lm_eval_results.json", str(tmp_path))
    items = json.loads(Path(results_file).read_text())["items"]
    assert list(items) == ["zorble"] and len(items["zorble"]) == int(logged.data.params["evaluation.limit"])
    out = tmp_path / "lm_eval_out"
    subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf",
         "--model_args", f"pretrained={dest / 'base'},peft={dest / 'adapter'}", "--include_path", str(dest / "tasks"),
         "--tasks", "zorble", "--samples", json.dumps(items), "--device", "cpu",
         "--batch_size", "8", "--output_path", str(out)],
        check=True, capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    results = json.loads(next(out.rglob("results*.json")).read_text())
    assert results["results"]["zorble"]["acc,none"] == pytest.approx(logged.data.metrics["zorble/acc"], abs=1e-9)


def _artifact_json(finished_sweep, run_id: str, name: str, tmp_path: Path) -> dict:
    from qsweep.tracking import client

    return json.loads(Path(client(finished_sweep["uri"]).download_artifacts(run_id, name, str(tmp_path))).read_text())


def test_cheap_and_final_stages_score_the_items_they_claim(finished_sweep, tmp_path):
    from qsweep.tracking import client

    test_items = sum(1 for _ in open(Path(__file__).resolve().parent.parent / "evaluation/tasks/zorble/test.jsonl"))
    cheap_ids = set()
    for run in _trial_runs(finished_sweep["uri"]):
        run_id = run.info.run_id
        cheap = _artifact_json(finished_sweep, run_id, "lm_eval_results.json", tmp_path / run_id)["items"]["zorble"]
        samples = client(finished_sweep["uri"]).download_artifacts(run_id, "lm_eval_samples.jsonl", str(tmp_path / run_id))
        scored = sorted(json.loads(line)["doc_id"] for line in Path(samples).read_text().splitlines())
        assert scored == sorted(cheap) and len(cheap) == CHEAP_ITEMS
        cheap_ids.add(tuple(cheap))
        final = _artifact_json(finished_sweep, run_id, "final_items.json", tmp_path / run_id)["items"]
        assert list(final) == ["zorble"] and len(set(final["zorble"])) == FINAL_ITEMS
        assert set(final["zorble"]) <= set(range(test_items))
        # An accuracy over FINAL_ITEMS items is a whole number of hits.
        hits_final = run.data.metrics["final/zorble/acc"] * FINAL_ITEMS
        assert hits_final == pytest.approx(round(hits_final), abs=1e-6)
        hits = [json.loads(line)["acc"] for line in Path(samples).read_text().splitlines()]
        assert run.data.metrics["zorble/acc"] == pytest.approx(sum(hits) / len(hits))
    assert len(cheap_ids) == 1, "every trial must be scored on the same seeded items"


def test_baselines_per_quant_type_and_each_trials_delta(finished_sweep):
    (parent,) = SweepBench.runs(finished_sweep["uri"], "e2e", "sweep")
    baselines = {q: parent.data.metrics[f"baseline/{q}/zorble/acc"] for q in ("nf4", "fp4")}
    assert parent.data.metrics["baseline/zorble/acc"] == baselines["nf4"]
    runs = {r.info.run_id: r.data.metrics for r in _trial_runs(finished_sweep["uri"])}
    cheap, final = parent.data.tags["qsweep.winner.cheap"], parent.data.tags["qsweep.winner.final"]
    assert runs[cheap]["zorble/acc"] == max(m["zorble/acc"] for m in runs.values())
    assert runs[final]["final/zorble/acc"] == max(m["final/zorble/acc"] for m in runs.values())
    assert parent.data.metrics["stages_agree"] == float(cheap == final)
    for run in _trial_runs(finished_sweep["uri"]):
        quant = run.data.params["quantization.quant_type"]
        assert run.data.metrics["delta/zorble/acc"] == pytest.approx(run.data.metrics["zorble/acc"] - baselines[quant])


def test_search_insight_is_on_the_parent_run(finished_sweep):
    from qsweep.tracking import client

    mlflow_client = client(finished_sweep["uri"])
    (parent,) = SweepBench.runs(finished_sweep["uri"], "e2e", "sweep")
    names = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "search_insight")}
    assert {"search_insight/search_insight.json", "search_insight/param_importances.png",
            "search_insight/optimization_history.png"} <= names


def test_an_adapter_refuses_a_different_base_or_quantization(finished_sweep):
    from qsweep.config.schema import ModelConfig
    from qsweep.report.replay import ProvenanceError, fetch_logged_trial, load_trained

    logged = fetch_logged_trial(finished_sweep["uri"], _best_run_id(finished_sweep))
    quant = logged.trial.quantization
    other = quant.model_copy(update={"quant_type": "fp4" if quant.quant_type == "nf4" else "nf4"})
    with pytest.raises(ProvenanceError, match="quantization.quant_type"):
        load_trained(logged.trial.model_copy(update={"quantization": other}), logged.adapter_dir, Path("."))
    with pytest.raises(ProvenanceError, match="hash"):
        load_trained(logged.trial.model_copy(update={"model": ModelConfig(name="tiny-gpt2")}), logged.adapter_dir,
                     Path("."))
    model, _ = load_trained(logged.trial, logged.adapter_dir, Path("."))
    assert model.peft_config["default"].r == logged.trial.lora.r
