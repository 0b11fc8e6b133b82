"""No lost writes: many writers on one MLflow sqlite file at once."""

from __future__ import annotations

import copy
import multiprocessing
from pathlib import Path

import pytest

from qsweep import tracking

WRITERS = 8
PARAMS = 120
METRICS = 30
STEPS = 5


def _write_one_run(uri: str, experiment_id: str, index: int) -> str:
    mlflow_client = tracking.client(uri)
    run_id = tracking.start_run(mlflow_client, experiment_id, f"writer-{index}", {"writer": str(index)})
    tracking.log_batch(mlflow_client, run_id, params={f"p{i}": f"{index}-{i}" for i in range(PARAMS)})
    for step in range(STEPS):
        tracking.log_batch(mlflow_client, run_id, metrics={f"m{i}": index + i + step for i in range(METRICS)},
                           step=step)
    tracking.end_run(mlflow_client, run_id, "FINISHED")
    return run_id


def test_eight_concurrent_writers_lose_no_param_or_metric(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "concurrency")
    with multiprocessing.get_context("spawn").Pool(WRITERS) as pool:
        run_ids = pool.starmap(_write_one_run, [(uri, experiment_id, i) for i in range(WRITERS)])
    mlflow_client = tracking.client(uri)
    assert len(set(run_ids)) == WRITERS
    for run_id in run_ids:
        run = mlflow_client.get_run(run_id)
        index = int(run.data.tags["writer"])
        assert run.info.status == "FINISHED"
        assert run.data.params == {f"p{i}": f"{index}-{i}" for i in range(PARAMS)}
        assert len(run.data.metrics) == METRICS
        history = mlflow_client.get_metric_history(run_id, "m0")
        assert sorted(m.step for m in history) == list(range(STEPS))


@pytest.mark.slow
def test_eight_trials_running_at_once_are_all_recorded(tmp_path: Path, tiny_sweep_base: dict, sweep_bench):
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["name"] = "eight"
    sweep["search"].update({"num_trials": WRITERS, "max_concurrent": WRITERS, "asha": {"enabled": False}})
    sweep["resources"] = {"cpus_per_trial": 0.25}
    result = sweep_bench.invoke("run", sweep_bench.write(tmp_path, sweep))
    assert result.exit_code == 0, result.output
    mlflow_client = tracking.client(sweep["tracking"]["uri"])
    runs = sweep_bench.runs(sweep["tracking"]["uri"], "eight")
    assert len(runs) == WRITERS
    param_counts = {len(r.data.params) for r in runs}
    assert len(param_counts) == 1, f"runs hold different numbers of params: {param_counts}"
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"zorble/acc", "peak_memory_mb", "tokens_per_second", "eval_loss"} <= set(run.data.metrics)
        assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "eval_loss")] == [5, 10]
