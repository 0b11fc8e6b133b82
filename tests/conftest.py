"""Shared fixtures. No hub here: everything runs offline on models built in-process."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QSWEEP_CACHE", str(REPO / ".qsweep-cache"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    from qsweep.train.models import resolve_model

    return resolve_model("tiny-llama").path


@pytest.fixture(scope="session")
def tiny_gpt2() -> Path:
    from qsweep.train.models import resolve_model

    return resolve_model("tiny-gpt2").path


@pytest.fixture(scope="session")
def zorble_dir() -> Path:
    return REPO / "evaluation" / "tasks" / "zorble"


@pytest.fixture
def tiny_sweep_dict(tiny_sweep_base: dict) -> dict:
    return copy.deepcopy(tiny_sweep_base)


@pytest.fixture(scope="session")
def tiny_sweep_base(zorble_dir: Path) -> dict:
    """A complete sweep on the tiny random model: seconds per trial."""
    return {
        "name": "tiny",
        "model": {"name": "tiny-llama"},
        "data": {
            "train": str(zorble_dir / "train.jsonl"),
            "validation": str(zorble_dir / "validation.jsonl"),
            "prompt": "Q: {question}\nA:",
            "completion": " {answer}",
            "max_seq_length": 32,
        },
        "training": {"max_steps": 10, "batch_size": 4, "eval_every": 5},
        "search": {"space": str(REPO / "search_spaces" / "qlora.yaml"), "num_trials": 2, "metric": "zorble/acc"},
        "evaluation": {"tasks": ["zorble"], "limit": 8},
    }


@pytest.fixture
def unquantized_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """qsweep's cache with the built models but no stored 4-bit base (train.quantized): a task
    quantizes its base (and allocates, under its cap), and no base stored by another test changes it."""
    from qsweep.config.paths import cache_dir

    built, fresh = cache_dir(), tmp_path / "cache"
    fresh.mkdir()
    for name in ("models", "hashes"):
        if (built / name).exists():
            (fresh / name).symlink_to(built / name)
    monkeypatch.setenv("QSWEEP_CACHE", str(fresh))
    return fresh


@pytest.fixture(scope="session")
def sweep_bench():
    """Write a sweep with its own MLflow store and outputs, run qsweep on it, read its runs."""
    from sweep_bench import SweepBench

    return SweepBench()
