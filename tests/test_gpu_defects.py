"""The GPU path's five defects (issue 11), each pinned by a test that runs without a GPU.

1. the per-process CUDA cap leaves room for the context the request counted;
2. trials are sized from the Ray cluster's GPU nodes, not the driver's own device;
3. `auto` is plain AdamW, and the estimate counts the optimizer the trial builds;
4. calibration never shrinks a budget under the estimate;
5. baseline and final-stage scoring tasks are capped like trials.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qsweep.config.policy import compute_dtype_name, optimizer_name
from qsweep.config.schema import SweepConfig
from qsweep.resources.caps import tensor_fraction
from qsweep.resources.estimate import CUDA_CONTEXT_MIB, MIB
from qsweep.resources.packing import (
    CARD_MB_RESOURCE,
    Card,
    Machine,
    UnknownCard,
    budget_mb,
    fit_calibration,
    machine_from_nodes,
    ray_share,
    resources_for,
    trial_estimate,
)

CARD_80 = 80 * 1024
CARD_24 = 24 * 1024


# --- 1. the cap is the share less the context ----------------------------------------------------


def test_packed_trials_and_their_contexts_fit_on_the_card_together():
    shares = [0.25, 0.25, 0.3, 0.2]
    used = sum(tensor_fraction(share, CARD_80) * CARD_80 + CUDA_CONTEXT_MIB for share in shares)
    assert used <= CARD_80
    assert tensor_fraction(0.25, CARD_80) == pytest.approx((0.25 * CARD_80 - CUDA_CONTEXT_MIB) / CARD_80)


def test_the_cap_gives_a_trial_exactly_the_budget_its_request_was_sized_for(tiny_sweep_dict, tiny_llama):
    sweep = SweepConfig(**tiny_sweep_dict)
    estimate = trial_estimate(sweep.trial(), tiny_llama, "cuda")
    share = resources_for(sweep, tiny_llama, Machine("cuda", CARD_80))({})["gpu"]
    tensors_mb = tensor_fraction(share, CARD_80, estimate.runtime_overhead) * CARD_80
    # The share is rounded up to Ray's 1e-4 units, plus one: at most two units over the budget.
    assert budget_mb(estimate) <= tensors_mb <= budget_mb(estimate) + 2e-4 * CARD_80


def test_a_share_survives_rays_loss_of_a_unit():
    for wanted in (0.0226, 0.0225001, 0.25, 0.999, 0.00012):
        # Ray may keep one 1e-4 unit less than the request (see the simulated-cluster test).
        assert ray_share(wanted) - 1e-4 >= wanted - 1e-12
    assert ray_share(1.2) == 1.0


def test_a_share_no_larger_than_the_context_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="gpus_per_trial"):
        tensor_fraction(0.005, CARD_80)


# --- 2. the cluster, not the driver's device 0 ---------------------------------------------------


def _node(node_id: str, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 4.0, **resources}}


def _no_card(node_id: str) -> None:
    return None


def test_a_cpu_only_head_with_gpu_workers_gives_gpu_trials():
    nodes = [_node("head"), _node("worker", GPU=4.0, **{CARD_MB_RESOURCE: CARD_80})]
    assert machine_from_nodes(nodes, _no_card) == Machine("cuda", CARD_80)


def test_mixed_cards_are_sized_for_the_smallest_one():
    nodes = [_node("head"), _node("big", GPU=8.0, **{CARD_MB_RESOURCE: CARD_80}),
             _node("small", GPU=1.0, **{CARD_MB_RESOURCE: CARD_24})]
    assert machine_from_nodes(nodes, _no_card) == Machine("cuda", CARD_24)


def test_a_gpu_node_without_a_declared_card_is_probed_on_that_node():
    asked = []

    def probe(node_id: str) -> Card:
        asked.append(node_id)
        return Card(40 * 1024)

    nodes = [_node("head"), _node("declared", GPU=1.0, **{CARD_MB_RESOURCE: CARD_80}), _node("silent", GPU=2.0)]
    assert machine_from_nodes(nodes, probe) == Machine("cuda", 40 * 1024)
    assert asked == ["silent"]


def test_a_gpu_node_whose_card_cannot_be_read_is_an_error_naming_the_fix():
    with pytest.raises(UnknownCard, match=CARD_MB_RESOURCE):
        machine_from_nodes([_node("head"), _node("silent", GPU=1.0)], _no_card)


def test_a_cluster_without_gpus_gives_cpu_trials():
    assert machine_from_nodes([_node("head"), _node("worker")], _no_card).device == "cpu"


@pytest.mark.slow
def test_a_simulated_cluster_with_a_cpu_head_and_two_card_sizes(tiny_sweep_dict, tiny_llama):
    """Real Ray nodes (raylets) declaring fake GPUs: the request is sized for the 24 GB card, Ray
    places it on a GPU worker (never the CPU-only head), and an undeclared GPU node without CUDA
    is refused with the fix."""
    import ray
    from ray.cluster_utils import Cluster

    from qsweep.orchestrate.cluster import cluster_machine
    from qsweep.orchestrate.stages import ray_options

    small_store = 80 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                             "object_store_memory": small_store})
    gpu_nodes = {
        cluster.add_node(num_cpus=1, num_gpus=2, object_store_memory=small_store,
                         resources={CARD_MB_RESOURCE: CARD_80}).node_id,
        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=small_store,
                         resources={CARD_MB_RESOURCE: CARD_24}).node_id,
    }
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        machine = cluster_machine()
        assert machine == Machine("cuda", CARD_24)
        sweep = SweepConfig(**tiny_sweep_dict)
        request = resources_for(sweep, tiny_llama, machine)({})
        estimate = trial_estimate(sweep.trial(), tiny_llama, "cuda")
        assert request["gpu"] == pytest.approx((budget_mb(estimate) + estimate.runtime_overhead) / CARD_24, abs=2e-4)

        def node_and_share() -> tuple[str, float]:
            context = ray.get_runtime_context()
            return context.get_node_id(), context.get_assigned_resources().get("GPU", 0.0)

        node, share = ray.get(ray.remote(**ray_options(request))(node_and_share).remote())
        assert node in gpu_nodes
        # What Ray really assigned (it truncates shares to 1e-4) still holds the whole budget.
        assert tensor_fraction(share, CARD_24, estimate.runtime_overhead) * CARD_24 >= budget_mb(estimate)

        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=small_store)
        cluster.wait_for_nodes()
        with pytest.raises(UnknownCard, match=CARD_MB_RESOURCE):
            cluster_machine()
    finally:
        ray.shutdown()
        cluster.shutdown()


# --- 3. one optimizer policy, plain AdamW by default ---------------------------------------------


def test_auto_is_plain_adamw_on_every_device_and_a_named_optimizer_is_kept():
    assert optimizer_name("auto", "cuda") == "adamw_torch_fused"
    assert optimizer_name("auto", "cpu") == "adamw_torch"
    assert optimizer_name("paged_adamw_32bit", "cuda") == "paged_adamw_32bit"
    assert compute_dtype_name("float16", "cuda") == "float16"


def test_the_estimate_counts_the_optimizer_state_the_trial_builds(tiny_sweep_dict, tiny_llama, tmp_path):
    """One real Trainer step on the CPU: the optimizer the trial's arguments build holds exactly the
    state bytes the estimate counted for it (two fp32 moments per LoRA parameter)."""
    import datasets
    import torch
    from transformers import Trainer

    from qsweep.train.lora import attach_lora
    from qsweep.train.targets import linear_module_names, resolve_target_modules
    from qsweep.train.trial import load_base, resolve_compute_dtype, training_arguments

    trial = SweepConfig(**tiny_sweep_dict).trial()
    trial = trial.model_copy(update={"training": trial.training.model_copy(update={"max_steps": 1})})
    targets = resolve_target_modules(trial.lora.target_modules, linear_module_names(tiny_llama))
    model, _ = load_base(tiny_llama, trial.quantization)
    model = attach_lora(model, trial.lora.r, trial.lora.alpha, trial.lora.dropout, targets, False)
    ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16] * 4, "labels": ids})
    args = training_arguments(trial.training, tmp_path, resolve_compute_dtype(trial.quantization.compute_dtype), False)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    assert type(trainer.optimizer.optimizer).__module__.startswith("torch.optim")
    moments = sum(t.numel() * t.element_size() for state in trainer.optimizer.state.values()
                  for name, t in state.items() if name != "step")
    estimate = trial_estimate(trial, tiny_llama, "cpu")
    assert moments / MIB == pytest.approx(estimate.optimizer_state, rel=1e-6)


# --- 4. calibration never below 1 ----------------------------------------------------------------


def test_calibration_below_one_is_clamped_and_says_why():
    fitted = fit_calibration([(1000.0, 700.0), (500.0, 400.0)])
    assert fitted.factor == 1.0 and fitted.worst_ratio == pytest.approx(0.8)
    assert "below 1" in fitted.reason


# --- 5. scoring tasks are capped like trials -----------------------------------------------------

# limits.memory_mb of 1 MiB: nothing can quantize under it, so an uncapped task is the one that succeeds.
TOO_SMALL_MB = 1
# What the cap itself says when it stops an allocation (RLIMIT_DATA: ENOMEM from mmap, malloc or torch).
CAP_HIT = r"(?i)(cannot|can't) allocate memory"


def test_the_baseline_task_is_capped_like_a_trial(tiny_sweep_dict, unquantized_cache):
    import shutil

    from qsweep.orchestrate.stages import score_baseline

    trial = SweepConfig(**tiny_sweep_dict).trial().model_dump(mode="json")
    assert trial["limits"]["memory_mb"] is None
    assert score_baseline(trial, str(Path.cwd()), threads=1)["items"]  # uncapped, the same task succeeds
    shutil.rmtree(unquantized_cache / "quantized", ignore_errors=True)
    trial["limits"]["memory_mb"] = TOO_SMALL_MB
    with pytest.raises((MemoryError, RuntimeError, OSError), match=CAP_HIT):
        score_baseline(trial, str(Path.cwd()), threads=1)
    # The cap is lifted when the task ends: this process (a reused Ray worker) can allocate again.
    assert bytearray(64 * MIB)


def test_the_final_stage_task_is_capped_like_a_trial(tiny_sweep_dict, tmp_path, unquantized_cache):
    import shutil

    from qsweep.orchestrate.final import score_final
    from qsweep.train.trial import run_trial

    sweep = SweepConfig(**tiny_sweep_dict)
    trial = sweep.trial()
    trial = trial.model_copy(update={"training": trial.training.model_copy(update={"max_steps": 1, "eval_every": 1})})
    trial_dir = tmp_path / "trial"
    run_trial(trial, sweep.base_dir, trial_dir, report=lambda _: None)
    shutil.rmtree(unquantized_cache / "quantized", ignore_errors=True)
    log = str(tmp_path / "final_stage.log")
    # Uncapped, the same task succeeds.
    assert score_final([str(trial_dir)], {"limit": 2}, None, 1, log)["scores"][str(trial_dir)]["items"]

    logged = yaml.safe_load((trial_dir / "config.yaml").read_text())
    logged["limits"]["memory_mb"] = TOO_SMALL_MB
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(logged))
    shutil.rmtree(unquantized_cache / "quantized", ignore_errors=True)
    with pytest.raises((MemoryError, RuntimeError, OSError), match=CAP_HIT):
        score_final([str(trial_dir)], {"limit": 2}, None, 1, log)
