"""The GPU path's defects found by reading it (issue 19, items 1-6, 9, 11, 12), each pinned by a test.

Most run on the CPU: the baseline claimed once (two processes; a real sweep of two concurrent
trials), a scored base freed, GPU tasks in fresh workers, the allocator setting and the reserved
peak calibrated on, the embedded random Llama built on the CPU, the measured CUDA context stored and
used, an oversized trial refused before loading, the cap at the smaller of share and
limits.memory_mb, gpus_per_trial bounded, MPS detected. What only a card can tell is marked `gpu`.
"""

from __future__ import annotations

import copy
import gc
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from qsweep import tracking
from qsweep.config.schema import SweepConfig, SweepFileError, load_sweep
from qsweep.evaluate import claims
from qsweep.orchestrate.stages import ray_options, scoring_task
from qsweep.resources.caps import allocator_settings, cuda_fraction, tensor_fraction
from qsweep.resources.estimate import CUDA_CONTEXT_MIB
from qsweep.resources.gpu import mps_running
from qsweep.resources.packing import (
    Card,
    DoesNotFit,
    Machine,
    budget_mb,
    cuda_context,
    machine_from_nodes,
    needed_mb,
    refuse_oversized,
    sized_estimate,
    resources_for,
    save_cuda_contexts,
    trial_estimate,
)

REPO = Path(__file__).resolve().parent.parent
CARD_80 = 80 * 1024


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty calibration (qsweep's cache with the built models only)."""
    from qsweep.config.paths import cache_dir

    built, fresh = cache_dir(), tmp_path / "cache"
    fresh.mkdir()
    for name in ("models", "hashes", "quantized", "structure"):
        if (built / name).exists():
            (fresh / name).symlink_to(built / name)
    monkeypatch.setenv("QSWEEP_CACHE", str(fresh))
    return fresh


# --- 1. the untuned base is claimed by one trial --------------------------------------------------


def _claim_when_released(path: str, start, wins) -> None:
    start.wait()
    if claims.claim(Path(path)) is not None:
        wins.put(os.getpid())


def test_of_two_processes_racing_for_a_claim_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        path = str(tmp_path / f"key{attempt}.claim")
        start, wins = context.Event(), context.Queue()
        racers = [context.Process(target=_claim_when_released, args=(path, start, wins)) for _ in range(2)]
        for racer in racers:
            racer.start()
        start.set()
        for racer in racers:
            racer.join(60)
        winners = []
        while not wins.empty():
            winners.append(wins.get())
        assert len(winners) == 1, winners
        assert claims.holder(Path(path))["pid"] == winners[0]


def test_a_claim_of_a_dead_process_here_is_taken_over_and_a_live_or_remote_one_is_not(tmp_path):
    dead = tmp_path / "dead.claim"
    code = f"from pathlib import Path; from qsweep.evaluate import claims; assert claims.claim(Path({str(dead)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    taken = claims.claim(dead)
    assert taken is not None and claims.holder(dead)["pid"] == os.getpid()
    assert claims.claim(dead) is None  # held now by a live process (this one)
    taken.release()
    assert claims.holder(dead)["pid"] != os.getpid()  # the dead one's claim is what is left: stale
    assert claims.claim(dead) is not None

    remote = tmp_path / "remote.claim"
    remote.write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-elsewhere", "time": 0}))
    assert claims.claim(remote) is None
    gone = tmp_path / "gone.claim"
    gone.write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname(), "time": 0}))  # no such pid
    assert claims.claim(gone) is not None


@pytest.fixture(scope="module")
def concurrent_sweep(tmp_path_factory, tiny_sweep_base, sweep_bench) -> dict:
    """Two trials of one 4-bit type started together, on a baseline question no cache has answered."""
    workdir = tmp_path_factory.mktemp("claim")
    (workdir / "lr.yaml").write_text(yaml.safe_dump({"params": {"training.learning_rate": {
        "low": 1e-4, "high": 1e-2, "log": True}}}))
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["name"] = "claim"
    sweep["quantization"] = {"quant_type": "nf4"}
    sweep["training"]["max_steps"] = 4
    # A subset seed no earlier run used: the untuned base's score is in no evaluation cache.
    sweep["evaluation"]["subset_seed"] = uuid.uuid4().int % 10**9
    sweep["search"] = {**sweep["search"], "space": str(workdir / "lr.yaml"), "num_trials": 2, "max_concurrent": 2,
                       "asha": {"enabled": False}}
    sweep["resources"] = {"cpus_per_trial": 1}
    path = sweep_bench.write(workdir, sweep)
    result = sweep_bench.invoke("run", path)
    uri = f"sqlite:///{workdir}/mlflow.db"
    return {"result": result, "runs": sweep_bench.runs(uri, "claim"),
            "parents": sweep_bench.runs(uri, "claim", "sweep"), "log": (workdir / "runs" / "claim" / "sweep.log").read_text()}


@pytest.mark.slow
def test_two_trials_starting_together_score_the_untuned_base_once(concurrent_sweep):
    assert concurrent_sweep["result"].exit_code == 0, concurrent_sweep["result"].output
    runs = concurrent_sweep["runs"]
    assert len(runs) == 2 and all(r.data.tags["qsweep.outcome"] == "finished" for r in runs)
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert spans[1][0] < spans[0][1], "the two trials did not run at the same time"
    scored = [r for r in runs if r.data.metrics["baseline_seconds"] > 0]
    assert len(scored) == 1, [r.data.metrics["baseline_seconds"] for r in runs]
    assert "in a separate task" not in concurrent_sweep["log"]
    assert concurrent_sweep["log"].count("baseline nf4 scored in") == 1
    parent = concurrent_sweep["parents"][0]
    assert "baseline/nf4/zorble/acc" in parent.data.metrics


# --- 2. a base loaded to score it is freed -------------------------------------------------------


def _live_4bit_layers() -> set[int]:
    from bitsandbytes.nn import Linear4bit

    return {id(o) for o in gc.get_objects() if issubclass(type(o), Linear4bit)}


@pytest.fixture
def collector_off():
    """Python's automatic collection off: what a task leaves to it stays, as it may for minutes in a
    worker; only what the code frees explicitly is gone."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_the_base_a_trial_loads_to_score_its_baseline_is_freed_before_it_loads_its_own(tiny_sweep_dict,
                                                                                        collector_off):
    from qsweep.evaluate import cache as evaluation_cache
    from qsweep.train.trial import UntunedBase, score_untuned_base

    trial = SweepConfig(**tiny_sweep_dict).trial()
    key = uuid.uuid4().hex
    before = _live_4bit_layers()
    try:
        outcome = score_untuned_base(UntunedBase(trial, key, {"test": key}), REPO)
        assert outcome is not None and outcome["scores"]
        assert not _live_4bit_layers() - before
    finally:
        evaluation_cache.entry_path(key).unlink(missing_ok=True)


def test_a_scoring_task_leaves_no_model_in_its_worker(tiny_sweep_dict, collector_off):
    from qsweep.orchestrate.stages import score_baseline

    before = _live_4bit_layers()
    assert score_baseline(SweepConfig(**tiny_sweep_dict).trial().model_dump(mode="json"), str(REPO), 1)["scores"]
    assert not _live_4bit_layers() - before


# --- 3. GPU tasks in fresh worker processes -------------------------------------------------------


def test_gpu_tasks_run_once_per_worker_and_cpu_tasks_reuse_it():
    assert ray_options({"cpu": 2, "gpu": 0.25}) == {"num_cpus": 2, "num_gpus": 0.25, "memory": None, "max_calls": 1}
    assert ray_options({"cpu": 1, "memory": 2**30})["max_calls"] == 0


@pytest.mark.slow
def test_a_gpu_task_gets_a_fresh_process_each_call():
    """Ray with one fake GPU: two GPU tasks in a row run in two processes; CPU tasks (the control)
    share one."""
    import ray

    def pid() -> int:  # defined here: Ray's workers cannot import a test module
        return os.getpid()

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        on_gpu = scoring_task(pid, {"cpu": 1, "gpu": 0.5})
        on_cpu = scoring_task(pid, {"cpu": 1})
        assert ray.get(on_gpu.remote()) != ray.get(on_gpu.remote())
        assert ray.get(on_cpu.remote()) == ray.get(on_cpu.remote())
    finally:
        ray.shutdown()


# --- 4. expandable segments; the reserved peak measured and calibrated on -------------------------


def test_trial_processes_get_expandable_segments_and_a_users_setting_is_kept():
    assert allocator_settings({}) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert allocator_settings({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == {
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}
    assert allocator_settings({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    assert allocator_settings({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}) == {
        "PYTORCH_ALLOC_CONF": "expandable_segments:False"}


@pytest.mark.slow
def test_the_ray_a_sweep_starts_gives_its_workers_the_allocator_setting(monkeypatch):
    import ray

    from qsweep.orchestrate.driver import connect_ray

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert connect_ray(None)
    try:
        seen = ray.get(ray.remote(lambda: os.environ.get("PYTORCH_CUDA_ALLOC_CONF")).remote())
    finally:
        ray.shutdown()
    assert seen == "expandable_segments:True"


def test_calibrate_learns_from_the_reserved_peak_on_cuda_and_the_context_per_card(tmp_path, fresh_cache):
    from typer.testing import CliRunner

    from qsweep.cli import app
    from qsweep.resources.packing import calibration

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "calib")
    mlflow_client = tracking.client(uri)
    logged = [  # (card, metrics): reserved 20% over the estimate while allocated stays under it
        ("NVIDIA H100 80GB HBM3", {"memory_estimate_mb": 1000.0, "peak_memory_mb": 1200.0, "peak_reserved_mb": 1200.0,
                                   "peak_allocated_mb": 950.0, "cuda_context_mb": 812.0}),
        ("NVIDIA H100 80GB HBM3", {"memory_estimate_mb": 500.0, "peak_memory_mb": 520.0, "peak_reserved_mb": 520.0,
                                   "peak_allocated_mb": 490.0, "cuda_context_mb": 790.0}),
        # Logged before peaks were reserved ones: its peak_memory_mb was allocated memory, not what the cap limits.
        ("NVIDIA A100-SXM4-40GB", {"memory_estimate_mb": 1000.0, "peak_memory_mb": 1500.0}),
    ]
    for card, metrics in logged:
        run_id = tracking.start_run(mlflow_client, experiment_id, "t", {"qsweep.outcome": "finished"})
        tracking.log_batch(mlflow_client, run_id, params={"provenance.device": card}, metrics=metrics)
    result = CliRunner().invoke(app, ["calibrate", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert calibration("cuda") == pytest.approx(1.2)
    assert cuda_context("NVIDIA H100 80GB HBM3") == pytest.approx(812.0)
    assert cuda_context("NVIDIA A100-SXM4-40GB") == CUDA_CONTEXT_MIB


def test_on_a_cpu_a_trial_logs_its_peak_as_before_and_no_cuda_figures(tiny_sweep_dict, tmp_path):
    from qsweep.train.trial import run_trial

    trial = SweepConfig(**tiny_sweep_dict).trial()
    trial = trial.model_copy(update={"training": trial.training.model_copy(update={"max_steps": 2, "eval_every": 2})})
    metrics = run_trial(trial, REPO, tmp_path / "trial", report=lambda _: None).metrics
    assert metrics["peak_memory_mb"] > 0
    assert metrics["memory_ratio"] == pytest.approx(metrics["peak_memory_mb"] / metrics["memory_estimate_mb"])
    assert not {"peak_reserved_mb", "peak_allocated_mb", "process_footprint_mb", "cuda_context_mb"} & set(metrics)


# --- 5. the embedded random Llamas are built on the CPU -------------------------------------------

SMALL_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)


def test_a_random_llama_is_built_with_the_shapes_and_dtype_of_its_config(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qsweep.train import models

    monkeypatch.setitem(models.RANDOM_LLAMA_SHAPES, "random-llama-test", SMALL_LLAMA)
    models.build_random_llama(tmp_path, "random-llama-test")
    weights = load_file(tmp_path / "model.safetensors")
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(models.random_llama_config("random-llama-test"),
                                                     dtype=torch.bfloat16)
    expected = {name: tuple(p.shape) for name, p in reference.named_parameters()}  # tied weights once
    assert {name: tuple(t.shape) for name, t in weights.items()} == expected
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert torch.all(weights["model.norm.weight"] == 1)
    assert 0.01 < weights["model.layers.0.mlp.up_proj.weight"].float().std() < 0.03  # initializer_range 0.02


BUILD_AND_REPORT = """
import json, sys, torch
from pathlib import Path
from qsweep.train import models
models.RANDOM_LLAMA_SHAPES["random-llama-test"] = json.loads(sys.argv[2])
models.build_random_llama(Path(sys.argv[1]), "random-llama-test")
print(json.dumps({"cuda_available": torch.cuda.is_available(), "cuda_initialized": torch.cuda.is_initialized()}))
"""


@pytest.mark.gpu
def test_building_a_random_llama_leaves_no_cuda_context_in_the_builder(tmp_path):
    out = subprocess.run([sys.executable, "-c", BUILD_AND_REPORT, str(tmp_path), json.dumps(SMALL_LLAMA)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"cuda_available": True, "cuda_initialized": False}


DRIVER_SIZES = """
import json, sys, torch
from qsweep.config.schema import load_sweep
from qsweep.orchestrate.stages import baseline_key, baseline_trial
from qsweep.preflight.validate import validate_sweep
from qsweep.resources.packing import resources_for, this_machine
from qsweep.train.models import resolve_model
sweep = load_sweep(sys.argv[1])
validate_sweep(sweep, sys.argv[1])
machine = this_machine()
request = resources_for(sweep, resolve_model(sweep.model.name).path, machine)({})
baseline_key(baseline_trial(sweep, "nf4"), sweep.base_dir)
print(json.dumps({"cuda_initialized": torch.cuda.is_initialized(), "card_mb": machine.memory_mb,
                  "gpu": request["gpu"]}))
"""


@pytest.mark.gpu
def test_the_driver_validates_and_sizes_trials_without_a_cuda_context_of_its_own(tmp_path, tiny_sweep_dict):
    import torch

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep_dict))
    out = subprocess.run([sys.executable, "-c", DRIVER_SIZES, str(path)], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["cuda_initialized"] is False and 0 < seen["gpu"] < 1
    assert seen["card_mb"] == torch.cuda.get_device_properties(0).total_memory / 2**20  # torch's own figure


# --- 6. the CUDA context measured, stored per card and used ---------------------------------------


def test_a_measured_context_replaces_the_guess_on_its_card_only(fresh_cache):
    assert cuda_context("NVIDIA H100 80GB HBM3") == cuda_context(None) == CUDA_CONTEXT_MIB
    save_cuda_contexts({"NVIDIA H100 80GB HBM3": [700.0, 810.0]})
    save_cuda_contexts({"NVIDIA H100 80GB HBM3": [750.0], "": [999.0]})  # a smaller later one keeps the largest
    assert cuda_context("NVIDIA H100 80GB HBM3") == 810.0
    assert cuda_context("NVIDIA L4") == CUDA_CONTEXT_MIB
    assert cuda_context(None) == 810.0  # an unnamed card: the largest measured anywhere
    stored = json.loads((fresh_cache / "calibration.json").read_text())["cuda_context"]
    assert stored == {"NVIDIA H100 80GB HBM3": {"mb": 810.0, "runs": 3}}


def test_trials_are_sized_and_capped_with_the_context_measured_on_their_card(fresh_cache, tiny_sweep_dict,
                                                                             tiny_llama):
    from qsweep.orchestrate.sharing import record_cuda_contexts

    record_cuda_contexts([{"measures": {"cuda_context_mb": 900.0}, "provenance": {"device": "NVIDIA H100"}},
                          {"measures": {"peak_memory_mb": 10.0}, "provenance": {"device": "cpu"}}])
    machine = machine_from_nodes([{"NodeID": "n", "Resources": {"GPU": 1.0}}],
                                 lambda node: Card(CARD_80, "NVIDIA H100"))
    assert machine == Machine("cuda", CARD_80, "NVIDIA H100", 900.0)
    sweep = SweepConfig(**tiny_sweep_dict)
    estimate = trial_estimate(sweep.trial(), tiny_llama, "cuda", context_mb=machine.context_mb)
    share = resources_for(sweep, tiny_llama, machine)({})["gpu"]
    assert share == pytest.approx((budget_mb(estimate) + 900.0) / CARD_80, abs=2e-4)
    # The cap the trial sets from that share and the same context leaves it its whole budget.
    assert budget_mb(estimate) <= tensor_fraction(share, CARD_80, machine.context_mb) * CARD_80


@pytest.mark.gpu
def test_a_trial_on_cuda_logs_its_reserved_peak_and_its_measured_footprint(tiny_sweep_dict, tmp_path):
    import torch

    from qsweep.train.trial import run_trial

    trial = SweepConfig(**tiny_sweep_dict).trial()
    trial = trial.model_copy(update={"training": trial.training.model_copy(update={"max_steps": 2, "eval_every": 2})})
    metrics = run_trial(trial, REPO, tmp_path / "trial", report=lambda _: None).metrics
    assert metrics["peak_memory_mb"] == metrics["peak_reserved_mb"] >= metrics["peak_allocated_mb"] > 0
    assert metrics["memory_ratio"] == pytest.approx(metrics["peak_memory_mb"] / metrics["memory_estimate_mb"])
    # NVML sees this process (nvidia-ml-py is a dependency): its footprint holds what torch reserved plus a context.
    assert metrics["process_footprint_mb"] > torch.cuda.memory_reserved() / 2**20
    assert 100 < metrics["cuda_context_mb"] < 4096


# --- 9. a trial too big for the card is refused before it loads -----------------------------------


def _big(sweep: SweepConfig):
    trial = sweep.trial()
    return trial.model_copy(update={"training": trial.training.model_copy(update={"batch_size": 64})})


def _card_between(sweep: SweepConfig, model_path: Path) -> float:
    """A card the sweep's base trial fits and its big variant (_big) does not."""
    small, big = (needed_mb(sized_estimate(t, sweep.base_dir, model_path, "cuda")) for t in (sweep.trial(), _big(sweep)))
    assert small < big
    return (small + big) / 2


def test_validation_refuses_a_sweep_whose_smallest_trial_cannot_fit_the_card(tiny_sweep_dict, tiny_llama):
    from qsweep.preflight.fit import check_fits

    sweep = SweepConfig(**tiny_sweep_dict)
    needed = needed_mb(sized_estimate(sweep.trial(), sweep.base_dir, tiny_llama, "cuda"))
    problems = check_fits(sweep, None, tiny_llama, Machine("cuda", needed * 0.9))
    assert len(problems) == 1 and problems[0].startswith("resources: the smallest trial of this sweep needs ")
    assert f"{needed:,.0f} MiB" in problems[0] and "batch_size" in problems[0]
    assert check_fits(sweep, None, tiny_llama, Machine("cuda", needed * 1.1)) == []


def test_validation_warns_when_the_largest_trial_of_the_space_cannot_fit(tiny_sweep_dict, tiny_llama, caplog):
    from qsweep.preflight.fit import check_fits
    from qsweep.search.space import ParamSpec, SearchSpace

    sweep = SweepConfig(**tiny_sweep_dict)
    space = SearchSpace(params={"training.batch_size": ParamSpec(choices=[4, 64])})
    card = _card_between(sweep, tiny_llama)
    with caplog.at_level("WARNING", logger="qsweep.preflight.fit"):
        assert check_fits(sweep, space, tiny_llama, Machine("cuda", card)) == []
    assert "the largest trial the search space allows needs" in caplog.text and "refused" in caplog.text


def test_a_trial_too_big_for_the_card_gets_the_whole_card_and_refuses_itself(tiny_sweep_dict, tiny_llama):
    sweep = SweepConfig(**tiny_sweep_dict)
    big = _big(sweep)
    card = _card_between(sweep, tiny_llama)
    machine = Machine("cuda", card)
    assert resources_for(sweep, tiny_llama, machine)({"training.batch_size": 64}) == {
        "cpu": 1, "gpu": 1.0}  # Ray can place it...
    with pytest.raises(DoesNotFit, match=f"this trial needs .* but one GPU has {card:,.0f} MiB"):
        refuse_oversized(big, sweep.base_dir, tiny_llama, machine, 1.0)  # ... and it refuses, before loading
    refuse_oversized(sweep.trial(), sweep.base_dir, tiny_llama, machine, 1.0)


@pytest.mark.slow
def test_an_oversized_trial_fails_at_once_and_the_sweep_goes_on(tmp_path, tiny_sweep_dict, tiny_llama):
    """Ray Tune runs qsweep's trainable sized for a small fake card: the big trial fails with its
    numbers before it loads anything, the other trains and is scored."""
    import ray
    from ray import tune

    from qsweep.orchestrate.sweep import train_trial
    from qsweep.search.objective import FAILED, OBJECTIVE

    sweep = SweepConfig(**tiny_sweep_dict)
    machine = Machine("cuda", _card_between(sweep, tiny_llama))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        trainable = tune.with_parameters(
            train_trial, base=sweep.trial().model_dump(mode="json"), base_dir=str(REPO),
            trials_root=str(tmp_path / "trials"), search=sweep.search.model_dump(mode="json"), threads=1,
            pending_baselines={}, machine=machine, calibration_factor=1.0)
        grid = tune.Tuner(trainable, param_space={"training.batch_size": tune.grid_search([64, 4]),
                                                  "training.max_steps": 2, "training.eval_every": 2},
                          run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0)).fit()
    finally:
        ray.shutdown()
    by_batch = {r.config["training.batch_size"]: r.metrics for r in grid}
    assert "DoesNotFit: this trial needs" in by_batch[64][FAILED] and "one GPU has" in by_batch[64][FAILED]
    assert not (tmp_path / "trials" / by_batch[64]["trial_id"] / "adapter").exists()
    assert OBJECTIVE in by_batch[4]


# --- 11. the cap is the smaller of share and limits.memory_mb; one GPU at most per trial ----------


def test_the_cap_is_the_smaller_of_the_share_and_limits_memory_mb():
    share_room = tensor_fraction(0.25, CARD_80)
    assert cuda_fraction(60_000, 0.25, CARD_80) == pytest.approx(share_room)  # the share is smaller
    assert cuda_fraction(1_000, 0.25, CARD_80) == pytest.approx(1_000 / CARD_80)  # memory_mb is smaller
    assert cuda_fraction(None, 0.25, CARD_80) == pytest.approx(share_room)
    assert cuda_fraction(1_000, None, CARD_80) == pytest.approx(1_000 / CARD_80)
    assert cuda_fraction(None, None, CARD_80) is None


@pytest.mark.parametrize("value", [2, 1.5, -0.25])
def test_gpus_per_trial_outside_one_gpu_is_refused_naming_the_field_and_the_fix(tmp_path, tiny_sweep_dict, value):
    from typer.testing import CliRunner

    from qsweep.cli import app

    tiny_sweep_dict["resources"] = {"gpus_per_trial": value}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep_dict))
    with pytest.raises(SweepFileError) as info:
        load_sweep(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"resources.gpus_per_trial: is {value:g}, but a trial runs on one GPU")
    assert "auto" in info.value.problems[0]
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "resources.gpus_per_trial" in result.output
    tiny_sweep_dict["resources"] = {"gpus_per_trial": 1}
    path.write_text(yaml.safe_dump(tiny_sweep_dict))
    assert load_sweep(path).resources.gpus_per_trial == 1


# --- 12. whether MPS runs, detected and logged ----------------------------------------------------


def test_no_mps_daemon_reads_as_not_running(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "absent"))
    assert not mps_running()
    (tmp_path / "control").write_text("")  # a plain file, not the daemon's socket
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mps_running()


def test_an_mps_control_socket_reads_as_running_until_its_daemon_is_gone(monkeypatch):
    import tempfile

    # A short folder: a UNIX socket's path has a limit of about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="mps-") as pipes:
        monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", pipes)
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.bind(str(Path(pipes) / "control"))
        daemon.listen(1)
        try:
            assert mps_running()
        finally:
            daemon.close()
        assert (Path(pipes) / "control").exists()  # left behind, as by a killed daemon
        assert not mps_running()


def test_each_sweep_records_whether_mps_runs(tmp_path, monkeypatch, caplog):
    from qsweep.orchestrate.sharing import MPS_TAG, log_gpu_sharing

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "absent"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(uri, "mps")
    on_gpu = tracking.start_run(mlflow_client, experiment_id, "gpu", {})
    on_cpu = tracking.start_run(mlflow_client, experiment_id, "cpu", {})
    with caplog.at_level("INFO", logger="qsweep.orchestrate.sharing"):
        log_gpu_sharing(uri, on_gpu, Machine("cuda", CARD_80, "NVIDIA H100"))
    log_gpu_sharing(uri, on_cpu, Machine("cpu", 16_000))
    assert mlflow_client.get_run(on_gpu).data.tags[MPS_TAG] == "not running"
    assert mlflow_client.get_run(on_cpu).data.tags[MPS_TAG] == "n/a (cpu)"
    assert "no control daemon runs" in caplog.text and "time-slice" in caplog.text
