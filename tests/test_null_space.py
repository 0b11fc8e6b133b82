"""`search.space: null` is the sweep's own trial, repeated: it validates and runs, never a crash."""

from __future__ import annotations

import pytest

from qsweep.config.schema import SweepConfig
from qsweep.preflight.space import load_space_of


def test_null_space_is_an_empty_space(tiny_sweep_dict: dict):
    tiny_sweep_dict["search"]["space"] = None
    space, source, problems = load_space_of(SweepConfig(**tiny_sweep_dict))
    assert space is not None and space.params == {}
    assert (source, problems) == ("", [])


@pytest.mark.slow  # a real one-trial sweep: Ray, MLflow, the 4-bit tiny model
def test_a_sweep_with_no_space_runs_its_own_trial(tiny_sweep_dict: dict, sweep_bench, tmp_path):
    tiny_sweep_dict["search"] = {"space": None, "num_trials": 1, "metric": "zorble/acc", "asha": {"enabled": False}}
    tiny_sweep_dict["training"] = {"max_steps": 4, "batch_size": 4, "eval_every": 2}
    path = sweep_bench.write(tmp_path, tiny_sweep_dict, experiment="nospace")
    result = sweep_bench.invoke("run", path)
    assert result.exit_code == 0, result.output
    assert "finished 1, stopped early 0, failed 0" in result.output, result.output
    (run,) = sweep_bench.runs(f"sqlite:///{tmp_path}/mlflow.db", "nospace")
    assert run.info.status == "FINISHED"
    # The trial is the sweep's own config, as written.
    assert run.data.params["lora.r"] == str(SweepConfig(**tiny_sweep_dict).trial().lora.r)
