"""The GPU proof's dry run on the CPU: scripts/gpu_proof.sh --device cpu runs the same phases as on a
GPU (pytest -m gpu, the packing bench, a real qsweep run) on tiny-llama and writes the same JSON, so
the command a GPU session runs once cannot rot between sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TRIALS = 2
# The shape a GPU run gives too (there the NVML figures are numbers, here None).
SWEEP_KEYS = {"exit_code", "timed_out", "wall_seconds", "trials", "trials_finished", "outcomes", "trials_per_hour",
              "oom", "tokens_per_second_summed", "memory_mean_share", "memory_peak_share", "memory_total_mb",
              "gpu_processes_at_once", "gpu_process_peaks_mb", "driver_on_card", "driver_gpu_mb", "killed_after",
              "mps_logged", "per_trial", "failures"}
TRIAL_KEYS = {"memory_estimate_mb", "peak_memory_mb", "peak_allocated_mb", "peak_reserved_mb", "process_footprint_mb",
              "memory_ratio", "peak_memory_over_estimate", "peak_reserved_over_estimate",
              "peak_allocated_over_estimate"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("proof")
    # Generous on a loaded 2-core CI machine; the phases share it as on a GPU. This venv's packages,
    # not a carry built for the GPU machine's Python that may lie in .carry/.
    env = {**os.environ, "OUT": str(out), "QSWEEP_PROOF_BUDGET_S": "1800", "PYTHON": sys.executable,
           "QSWEEP_CARRY": str(out / "no-carry")}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_proof.sh"), "--device", "cpu", "--model", "tiny-llama",
                           "--trials", str(TRIALS), "--steps", "2", "--sweep-trials", "2", "--sweep-steps", "2"],
                          capture_output=True, text=True, env=env, timeout=2400)
    proof = json.loads((out / "proof.json").read_text()) if (out / "proof.json").exists() else {}
    return {"done": done, "proof": proof, "out": out}


def test_the_dry_run_passes_every_phase_in_order(dry_run):
    done, proof = dry_run["done"], dry_run["proof"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(proof["phases"]) == ["build", "pytest", "packing", "sweep", "parent"]
    assert proof["ok"] and all(phase["ok"] for phase in proof["phases"].values())
    assert proof["device"] == f"cpu ({os.cpu_count()} cores)" and proof["model"] == "tiny-llama"


def test_the_gpu_tests_are_collected_and_skipped_without_a_gpu(dry_run):
    tests = dry_run["proof"]["phases"]["pytest"]
    assert tests["tests"] >= 7 and tests["skipped"] == tests["tests"], tests
    # Exactly the tests pytest itself selects with `-m gpu`, wherever they live.
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                             "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=600)
    selected = {line.strip() for line in listed.stdout.splitlines() if "::" in line}
    ran = {f"{module.replace('.', '/')}.py::{name}" for module, name in (c.split("::", 1) for c in tests["cases"])}
    assert selected and ran == selected, (sorted(ran ^ selected), listed.stdout[-2000:])
    assert "skipped" in (dry_run["out"] / "pytest_gpu.txt").read_text()


def test_the_packing_bench_reports_both_sweeps_in_the_gpu_shape(dry_run):
    packing = dry_run["proof"]["phases"]["packing"]
    for name in ("serial", "packed"):
        run = packing[name]
        assert SWEEP_KEYS <= set(run), (name, SWEEP_KEYS - set(run))
        assert run["trials_finished"] == TRIALS and run["oom"] == 0 and run["exit_code"] == 0, run
        assert len(run["per_trial"]) == TRIALS and all(set(t) == TRIAL_KEYS for t in run["per_trial"])
        for trial in run["per_trial"]:
            assert trial["peak_memory_over_estimate"] == pytest.approx(trial["peak_memory_mb"]
                                                                       / trial["memory_estimate_mb"])
    assert packing["packed_mps"] == {"skipped": "MPS is for CUDA devices"}
    assert packing["ratio_trials_per_hour"] == pytest.approx(packing["packed"]["trials_per_hour"]
                                                             / packing["serial"]["trials_per_hour"])
    assert packing["goals"] is None  # the goals are for a GPU


def test_the_real_sweep_finishes_with_its_report(dry_run):
    sweep = dry_run["proof"]["phases"]["sweep"]
    assert sweep["trials"] == 2 and sweep["report_written"] and sweep["exit_code"] == 0, sweep
    assert set(sweep["outcomes"]) <= {"finished", "stopped"} and sweep["outcomes"].get("finished")
