"""On a real CUDA device: packed trials stay under their caps, measured peaks are within 10% of
their estimates, and the optimizer a trial builds is the one its estimate counted.

Skipped without CUDA (tests/conftest.py). On a GPU machine: `pytest -m gpu` (scripts/gpu_proof.sh
runs it; tests/test_gpu_tests_resolve.py resolves its imports without a GPU). The model is
QSWEEP_GPU_TEST_MODEL, by default the embedded random-llama-1b (the Llama-3.2-1B shape with random
weights, built on first use: no hub needed).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("QSWEEP_GPU_TEST_MODEL", "random-llama-1b")
ESTIMATE_TOLERANCE = 0.10
FILLER = "The quick brown fox jumps over the lazy dog. 0123456789 "


@pytest.fixture(scope="module")
def full_rows(tmp_path_factory, zorble_dir) -> dict[str, str]:
    """zorble rows followed by filler, so every row fills max_seq_length as the estimate assumes."""
    folder = tmp_path_factory.mktemp("full_rows")
    files = {}
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (zorble_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps({**row, "filler": FILLER * 64}) + "\n" for row in rows))
        files[split] = str(path)
    return files


@pytest.fixture
def gpu_sweep(tiny_sweep_dict, full_rows) -> dict:
    sweep = copy.deepcopy(tiny_sweep_dict)
    sweep["model"] = {"name": MODEL}
    sweep["data"].update(train=full_rows["train"], validation=full_rows["validation"],
                         completion=" {answer}\n{filler}", max_seq_length=256)
    sweep["training"] = {"max_steps": 4, "batch_size": 4, "eval_every": 2}
    return sweep


def _trial(sweep: dict, **params):
    from qsweep.config.schema import SweepConfig
    from qsweep.search.space import apply_params

    return apply_params(SweepConfig(**sweep).trial(), params)


def _free_gpu() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("params", [
    {"lora.r": 8, "lora.target_modules": "attention"},
    {"lora.r": 64, "lora.target_modules": "all-linear"},
    {"lora.r": 16, "lora.target_modules": "all-linear", "training.gradient_checkpointing": True},
    {"lora.r": 16, "lora.target_modules": "all-linear", "training.batch_size": 1},
], ids=["r8-attention", "r64-all-linear", "r16-checkpointing", "r16-batch1"])
def test_measured_peaks_are_within_10_percent_of_their_estimates(gpu_sweep, tmp_path, params):
    from qsweep.train.trial import run_trial

    _free_gpu()
    trial = _trial(gpu_sweep, **params)
    outcome = run_trial(trial, REPO, tmp_path / "trial", report=lambda _: None)
    ratio = outcome.metrics["peak_memory_mb"] / outcome.metrics["memory_estimate_mb"]
    assert abs(ratio - 1) <= ESTIMATE_TOLERANCE, outcome.metrics


def test_the_optimizer_a_trial_builds_is_the_one_its_estimate_counted(gpu_sweep, tmp_path):
    import datasets
    import torch
    from transformers import Trainer

    from qsweep.config.policy import optimizer_name
    from qsweep.resources.estimate import MIB, estimate_trial_memory
    from qsweep.train.models import resolve_model
    from qsweep.train.lora import attach_lora
    from qsweep.train.targets import linear_module_names, resolve_target_modules
    from qsweep.train.trial import load_base, resolve_compute_dtype, resolve_optimizer, training_arguments

    _free_gpu()
    trial = _trial(gpu_sweep, **{"training.max_steps": 1})
    path = resolve_model(MODEL).path
    assert resolve_optimizer(trial.training.optimizer) == optimizer_name("auto", "cuda") == "adamw_torch_fused"
    model, _ = load_base(path, trial.quantization)
    model = attach_lora(model, trial.lora.r, trial.lora.alpha, trial.lora.dropout,
                        resolve_target_modules(trial.lora.target_modules, linear_module_names(path)), False)
    ids = torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 4, "labels": ids})
    args = training_arguments(trial.training, tmp_path, resolve_compute_dtype(trial.quantization.compute_dtype), False)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    state = [t for s in optimizer.state.values() for name, t in s.items() if name != "step"]
    assert all(t.is_cuda for t in state)  # on the card, inside the cap and the measured peak
    moments = sum(t.numel() * t.element_size() for t in state)
    assert moments / MIB == pytest.approx(estimate_trial_memory(trial, path, "cuda").optimizer_state, rel=1e-6)


CAP_PROBE = """
import sys, torch
from qsweep.resources.caps import tensor_fraction
share = float(sys.argv[1])
card = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(tensor_fraction(share, card / 2**20))
room = share * card - 550 * 2**20
kept = torch.empty(int(room * 0.9), dtype=torch.uint8, device="cuda")
try:
    torch.empty(int(room * 0.2), dtype=torch.uint8, device="cuda")
except torch.OutOfMemoryError:
    print("capped")
"""


def test_a_process_cannot_allocate_past_its_share_less_the_context():
    out = subprocess.run([sys.executable, "-c", CAP_PROBE, "0.1"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "capped"


def test_packed_trials_stay_under_their_caps(gpu_sweep, tmp_path):
    """A real sweep on this GPU: trials of different sizes packed by their shares; every trial
    finishes, none hit its cap, and several ran at once."""
    from typer.testing import CliRunner

    from qsweep import tracking
    from qsweep.cli import app
    from qsweep.config.schema import SweepConfig, TrialConfig
    from qsweep.resources.caps import tensor_fraction
    from qsweep.resources.packing import resource_request, sized_estimate, this_machine
    from qsweep.tracking.state import output_folder
    from qsweep.train.models import resolve_model

    sweep = copy.deepcopy(gpu_sweep)
    ranks = [8, 16, 32, 64]
    sweep["search"].update(num_trials=len(ranks), asha={"enabled": False}, baselines=[
        {"lora.r": r, "lora.target_modules": "all-linear", "quantization.quant_type": "nf4"} for r in ranks])
    sweep["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    sweep["output_dir"] = str(tmp_path / "runs")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    # Sized before the run: the sweep stores the CUDA context it measures, and later machines use it.
    machine, path = this_machine(), resolve_model(MODEL).path
    result = CliRunner().invoke(app, ["run", str(sweep_file)])
    assert result.exit_code == 0, result.output

    mlflow_client = tracking.client(sweep["tracking"]["uri"])
    runs = mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()],
                                     filter_string="tags.`qsweep.kind` = 'trial'")
    assert sorted(r.data.tags.get("qsweep.outcome") for r in runs) == ["finished"] * len(ranks)
    trials_root = output_folder(SweepConfig(**sweep)) / "trials"
    spans = []
    for run in runs:
        logged = yaml.safe_load((trials_root / run.data.tags["qsweep.trial_id"] / "config.yaml").read_text())
        trial = TrialConfig(**{k: v for k, v in logged.items() if k != "provenance"})
        estimate = sized_estimate(trial, sweep_file.parent, path, "cuda", machine.context_mb)
        share = resource_request(estimate, machine, 1)["gpu"]
        cap = tensor_fraction(share, machine.memory_mb, machine.context_mb) * machine.memory_mb
        assert run.data.metrics["peak_memory_mb"] <= cap
        spans.append((run.info.start_time, run.info.end_time))
    overlapping = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlapping >= 2, "the trials ran one at a time: nothing was packed"
