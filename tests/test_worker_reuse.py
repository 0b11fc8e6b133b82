"""A finished or stopped trial's worker process runs the next trial (Ray Tune's reuse_actors): start-up
paid once, and each trial still alone in its log, its peak and its cap."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import yaml

from qsweep.config.schema import SweepConfig
from qsweep.orchestrate.sweep import reuse_workers, trial_log
from qsweep.resources.caps import give_back_memory
from qsweep.resources.packing import Machine
from qsweep.search.space import load_space
from qsweep.train.trial import PeakMemory

GOOD, SLOW, BEST = 3e-3, 1e-5, 5e-3
CPU, CUDA = Machine("cpu", 16_000), Machine("cuda", 80_000)


def _space(tmp_path: Path, name: str, params: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"params": params}))
    return path


def _sweep(tiny_sweep_dict: dict, space: Path, **limits) -> SweepConfig:
    tiny_sweep_dict["search"]["space"] = str(space)
    return SweepConfig(**{**tiny_sweep_dict, "limits": limits})


def test_workers_are_reused_unless_a_trial_may_have_a_cpu_cap(tmp_path, tiny_sweep_dict):
    plain = _space(tmp_path, "plain", {"lora.r": {"choices": [4, 8]}})
    capped_in_space = _space(tmp_path, "capped", {"limits.memory_mb": {"choices": [None, 512]}})
    assert reuse_workers(_sweep(copy.deepcopy(tiny_sweep_dict), plain), load_space(plain), CPU)
    # RLIMIT_DATA would not count the heap an earlier trial left in the process.
    capped = _sweep(copy.deepcopy(tiny_sweep_dict), plain, memory_mb=512)
    assert not reuse_workers(capped, load_space(plain), CPU)
    in_space = _sweep(copy.deepcopy(tiny_sweep_dict), capped_in_space)
    assert not reuse_workers(in_space, load_space(capped_in_space), CPU)
    # torch's CUDA cap counts what the trial holds, and each trial empties the cache.
    assert reuse_workers(capped, load_space(plain), CUDA)


def test_a_trial_log_is_closed_when_the_trial_ends(tmp_path):
    with trial_log(tmp_path / "one" / "trial.log"):
        logging.getLogger("qsweep.train").info("the first trial's line")
    with trial_log(tmp_path / "two" / "trial.log"):
        logging.getLogger("qsweep.train").info("the second trial's line")
    logging.getLogger("qsweep.train").info("after both")
    assert (tmp_path / "one" / "trial.log").read_text().count("line") == 1
    assert "the second trial's line" in (tmp_path / "two" / "trial.log").read_text()
    assert "after both" not in (tmp_path / "two" / "trial.log").read_text()
    handlers = [h for name in ("qsweep", "transformers", "peft", "lm_eval") for h in logging.getLogger(name).handlers]
    assert not [h for h in handlers if isinstance(h, logging.FileHandler)]


def _a_trials_memory(model) -> tuple[float, list]:
    """A trial's growth in small blocks (activations, Python objects: glibc's heap, which keeps them
    resident once freed), some of which outlive it (caches, module state): its peak, and what it kept."""
    peak = PeakMemory(model)
    blocks = [bytearray(2048) for _ in range(100_000)]
    measured = peak.mb()
    return measured, blocks[::64]


def test_a_later_trial_in_the_process_measures_its_own_peak():
    import torch

    model = torch.nn.Linear(8, 8)
    first, kept = _a_trials_memory(model)
    assert first > 150
    give_back_memory()
    # Without giving the freed heap back, the second trial would reuse resident pages and its
    # peak would read as almost nothing.
    second, kept_too = _a_trials_memory(model)
    assert 0.8 < second / first < 1.25, (first, second)
    assert len(kept) == len(kept_too)


@pytest.fixture(scope="module")
def reused_sweep(tmp_path_factory, tiny_sweep_base, sweep_bench) -> dict:
    """Three trials one after another: the second one ASHA stops at its first rung (a learning rate
    300 times lower, the same seed and data), the third runs in the process the first two ran in."""
    workdir = tmp_path_factory.mktemp("reuse")
    (workdir / "lr.yaml").write_text(yaml.safe_dump({"params": {"training.learning_rate": {
        "low": 1e-6, "high": 1e-2, "log": True}}}))
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["name"] = "reuse"
    sweep["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    sweep["search"] = {
        **sweep["search"], "space": str(workdir / "lr.yaml"), "num_trials": 3, "max_concurrent": 1,
        "direction": "minimize",
        "asha": {"enabled": True, "grace_steps": 5, "reduction_factor": 2, "min_trials_per_rung": 1},
        "baselines": [{"training.learning_rate": GOOD}, {"training.learning_rate": SLOW},
                      {"training.learning_rate": BEST}],
    }
    path = sweep_bench.write(workdir, sweep)
    result = sweep_bench.invoke("run", path)
    runs = sweep_bench.runs(f"sqlite:///{workdir}/mlflow.db", "reuse", order_by=["attributes.start_time ASC"])
    return {"result": result, "runs": runs, "trials": workdir / "runs" / "reuse" / "trials"}


@pytest.mark.slow
def test_later_trials_run_in_the_first_trials_process(reused_sweep):
    assert reused_sweep["result"].exit_code == 0, reused_sweep["result"].output
    first, _stopped, third = reused_sweep["runs"]
    assert [r.data.tags["qsweep.outcome"] for r in reused_sweep["runs"]] == ["finished", "stopped", "finished"]
    # Only the first trial in a process pays its start-up and imports.
    assert first.data.metrics["setup_seconds"] > 0.5
    assert third.data.metrics["setup_seconds"] == 0.0


@pytest.mark.slow
def test_each_reused_trial_logs_alone(reused_sweep):
    _first, stopped, third = reused_sweep["runs"]
    logs = {run.data.tags["qsweep.trial_id"]: (reused_sweep["trials"] / run.data.tags["qsweep.trial_id"]
                                               / "trial.log").read_text() for run in reused_sweep["runs"]}
    for trial_id, text in logs.items():
        assert text.count("config: ") == 1, (trial_id, text)
    assert "validation loss" in logs[stopped.data.tags["qsweep.trial_id"]]
    assert "lm_eval" not in logs[stopped.data.tags["qsweep.trial_id"]]
    assert third.data.metrics["peak_memory_mb"] > 0
