"""A quickstart-shaped sweep whose MMLU guard is scored only in the final stage
(evaluation.final.tasks): on the finalists, each 4-bit type's finalists on one loaded base, and on the
untuned base once per 4-bit type. Real Ray, Optuna, bitsandbytes, peft, lm-eval and MLflow on the
tiny model, offline."""

from __future__ import annotations

import copy
import json

import pytest

from qsweep.evaluate import mmlu
from qsweep.tracking.state import output_folder

pytestmark = pytest.mark.slow

GUARD = f"{mmlu.GROUP}/acc"
# nf4 twice and fp4 twice (the sweep's own double quant, so each type's baseline shares its finalists'
# base): of the top 3, at least one type has two finalists.
POINTS = [{"quantization.quant_type": q, "quantization.double_quant": True, "lora.r": r, "lora.target_modules": "all-linear"}
          for q, r in (("nf4", 4), ("fp4", 4), ("nf4", 8), ("fp4", 8))]


@pytest.fixture(scope="module")
def guard_sweep(tmp_path_factory, tiny_sweep_base, sweep_bench) -> dict:
    from qsweep.config.schema import load_sweep

    assert mmlu.data_problem() is None
    workdir = tmp_path_factory.mktemp("final-guard")
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["search"] = {**sweep["search"], "num_trials": 4, "asha": {"enabled": False}, "baselines": POINTS}
    sweep["evaluation"] = {"tasks": ["zorble"], "limit": 8,
                           "final": {"top_k": 3, "tasks": [mmlu.GROUP], "per_subject": 1}}
    path = sweep_bench.write(workdir, sweep, experiment="final-guard")
    result = sweep_bench.invoke("run", path)
    return {"result": result, "uri": sweep["tracking"]["uri"], "folder": output_folder(load_sweep(path))}


def test_the_sweep_finishes_and_prints_the_bases_guard(guard_sweep):
    result = guard_sweep["result"]
    assert result.exit_code == 0, result.output
    assert "finished 4, stopped early 0, failed 0" in result.output
    assert f"untuned base model, final stage: {GUARD} = " in result.output


def test_only_the_finalists_carry_the_guard_beside_the_base(guard_sweep, sweep_bench):
    (parent,) = sweep_bench.runs(guard_sweep["uri"], "final-guard", "sweep")
    trials = sweep_bench.runs(guard_sweep["uri"], "final-guard")
    finalists = [r for r in trials if "final/zorble/acc" in r.data.metrics]
    assert len(trials) == 4 and len(finalists) == 3
    for run in trials:
        metrics = run.data.metrics
        # No trial was scored on the guard during the search.
        assert not any(k.startswith(mmlu.GROUP) for k in metrics), run.info.run_id
        if run not in finalists:
            assert not any(k.startswith(("final/", "delta/final/")) for k in metrics)
            continue
        base = parent.data.metrics[f"baseline/{run.data.params['quantization.quant_type']}/final/{GUARD}"]
        assert metrics[f"delta/final/{GUARD}"] == pytest.approx(metrics[f"final/{GUARD}"] - base)
        assert round(metrics[f"final/{GUARD}"] * 57, 6) == round(metrics[f"final/{GUARD}"] * 57)


def test_each_quantization_loads_its_base_once_for_all_its_finalists(guard_sweep, sweep_bench):
    trials = sweep_bench.runs(guard_sweep["uri"], "final-guard")
    types = sorted(r.data.params["quantization.quant_type"] for r in trials if "final/zorble/acc" in r.data.metrics)
    logs = sorted(guard_sweep["folder"].glob("final_stage_*.log"))
    assert len(logs) == len(set(types)) < len(types)
    texts = [log.read_text() for log in logs]
    assert [t.count("loaded the 4-bit base") for t in texts] == [1] * len(logs)
    assert sorted(t.count("scored on the shared base") for t in texts) == sorted(types.count(q) for q in set(types))


def test_the_leaderboard_says_not_scored_where_the_guard_was_not_scored(guard_sweep, sweep_bench):
    board = json.loads(sweep_bench.invoke("leaderboard", "--tracking-uri", guard_sweep["uri"], "--experiment",
                                          "final-guard", "--format", "json").output)
    assert board["mmlu"] == mmlu.GROUP and board["mmlu_stage"] == "final"
    assert [row["mmlu"] is None for row in board["rows"]] == [False, False, False, True]
    table = sweep_bench.invoke("leaderboard", "--tracking-uri", guard_sweep["uri"], "--experiment", "final-guard",
                               "--format", "markdown").output
    assert table.count("not scored") == 6  # the one trial left out: the guard, its delta and four categories
    report = (guard_sweep["folder"] / "report.html").read_text()
    assert "mmlu_offline (final)" in report and report.count("not scored") == 6
