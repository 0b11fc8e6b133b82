"""bench/anchor.py --quick: both sides run and score the quickstart's evaluation, and qsweep's profile adds up
to what its trials logged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_quick_bench_prints_both_walls_their_ratio_and_a_profile(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "anchor.py"), "--quick", "--warm"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    anchor, cold, warm = out["anchor"], out["qsweep_cold_cache"], out["qsweep_warm_cache"]
    # The walls are printed to 0.01 s and the ratio to 0.001: compare them at that precision.
    assert out["ratio_qsweep_cold_cache_over_anchor"] == pytest.approx(cold["wall_s"] / anchor["wall_s"], rel=2e-3)
    # Both sides score the quickstart's evaluation: every trial, then the top_k with the MMLU guard.
    assert anchor["scoring_s"] > 0 and anchor["final_stage_s"] > 0 and len(anchor["final"]) == 2
    assert all(f["mmlu_offline/acc"] is not None for f in anchor["final"]) and len(anchor["untuned_guard"]) >= 1
    profile = cold["profile"]
    assert profile["sweep_phases_s"]["final_stage"] > 0
    assert profile["ray_start_s"] > 0
    assert len(profile["trials"]) == 2 and all(t["outcome"] == "finished" for t in profile["trials"])
    for trial in profile["trials"]:
        assert trial["training_s"] > 0 and trial["lm_eval_s"] > 0 and trial["model_load_and_quantize_s"] > 0
        assert trial["trial_wall_in_worker_s"] >= trial["training_s"] + trial["lm_eval_s"]
    # The cold run scored both 4-bit types' baselines inside its trials; the warm one reused them.
    assert sum(t["untuned_base_scored_in_trial_s"] > 0 for t in profile["trials"]) == 2
    assert set(profile["baselines_from_cache"].values()) and all(
        v.startswith("stored ") for v in profile["baselines_from_cache"].values())
    warm_baselines, warm_trials = warm["profile"]["baselines_from_cache"], warm["profile"]["trials"]
    assert set(warm_baselines) == set(profile["baselines_from_cache"]) and len(warm_trials) == 2
    assert all(v.startswith("reused ") for v in warm_baselines.values())
    assert all(t["untuned_base_scored_in_trial_s"] == 0 for t in warm_trials)
    assert len(profile["mlflow_logging_per_trial_s"]) == 2
    assert {"trials", "search_insight", "ray_shutdown"} <= set(profile["sweep_phases_s"])
