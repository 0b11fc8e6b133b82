"""What a model's structure says (its linear layers, its shapes), read once per machine.

Reading it means building the model on the meta device (and, for the memory estimate, running a
forward pass there): 0.6 s of every `qsweep validate` and `run` on two cores, spent in the driver
before Ray can start. The structure depends only on config.json and the transformers version, so it
is stored under their hash. A model with remote code is read every time: its code can change
without its config changing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from qsweep.config.paths import cache_root

logger = logging.getLogger(__name__)

# Bumped whenever what is stored for a kind changes shape or meaning.
FORMAT = 2


def structure_key(model_path: Path, kind: str) -> str:
    config = hashlib.sha256((Path(model_path) / "config.json").read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps([FORMAT, kind, version("transformers"), config]).encode()).hexdigest()[:32]


def read_once(kind: str, model_path: Path, trust_remote_code: bool, read: Callable[[], Any]) -> Any:
    """`read()` (a JSON-able value) for this model, from the store when an earlier process read it."""
    if trust_remote_code or not (Path(model_path) / "config.json").is_file():
        return read()
    path = cache_root() / "structure" / f"{kind}-{structure_key(model_path, kind)}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        logger.warning("stored %s of %s unreadable (%s); reading it from the model again", kind, model_path, exc)
    value = read()
    if not cache_root().is_dir():
        # Only what builds into the cache creates it: `qsweep validate` on a fresh machine writes nothing.
        return value
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(value))
        partial.replace(path)
    except OSError as exc:
        logger.warning("could not store the %s of %s in %s: %s", kind, model_path, path.parent, exc)
    return value
