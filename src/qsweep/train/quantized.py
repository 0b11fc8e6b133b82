"""The 4-bit base on a CPU, quantized once per machine instead of once per trial.

bitsandbytes quantizes on a CPU at about 40 M parameters a second: 3.5 s of the 4 s a SmolLM2-135M
trial spent loading its base, paid again by every trial and every scoring task. transformers saves a
4-bit model as it is and loads it back without quantizing, so the first process on a machine to
quantize a base stores it in qsweep's cache and every later one loads it in ~0.2 s, bit-identical
(same tensors and quantization state, same logits: tests/test_quantized_base.py). On CUDA quantizing
takes milliseconds, so there the cache would only cost disk; models with remote code are left out,
since their saved copy would need that code beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

from qsweep.config.paths import cache_dir

logger = logging.getLogger(__name__)

FOLDER = "quantized"


def quantized_key(model_hash: str, bnb: Any) -> str:
    """What decides the stored bytes: the weights, every 4-bit setting (the compute dtype is saved
    in the config and used on load), and the versions that quantize and serialize them."""
    settings = {k: str(v) for k, v in sorted(bnb.to_dict().items())}
    versions = {name: version(name) for name in ("bitsandbytes", "transformers", "torch")}
    blob = json.dumps({"model": model_hash, "quantization": settings, "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def stored_folder(key: str) -> Path:
    return cache_dir() / FOLDER / key


def load_stored(folder: Path) -> Any | None:
    """The stored 4-bit base on the CPU, or None when none is stored under that key."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").exists():
        return None
    try:
        # The non-quantized layers stay fp32 on a CPU, as when quantizing (see train.trial.load_base).
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"})
    except Exception as exc:  # whatever broke the copy, quantizing from the original is the remedy
        logger.warning("the stored 4-bit base in %s is unreadable (%s); quantizing again to replace it", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    logger.info("4-bit base loaded as stored in %s", folder)
    return model


def store(model: Any, folder: Path) -> None:
    """Saves under a private name, then renames: a reader never sees half a model, and of two
    processes storing the same base at once, the first rename wins and the other's copy is dropped.
    A full disk costs the speed-up, never the trial."""
    partial = folder.with_name(f"{folder.name}.saving-{os.getpid()}")
    try:
        model.save_pretrained(partial)
        if folder.exists() and not (folder / "config.json").exists():
            shutil.rmtree(folder)  # left broken by hand: renames only ever leave complete copies
        partial.rename(folder)
        logger.info("4-bit base stored in %s: later trials on this machine load it without quantizing", folder)
    except OSError as exc:
        if not (folder / "config.json").exists():
            logger.warning("could not store the 4-bit base in %s (%s); trials quantize it each time", folder, exc)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
