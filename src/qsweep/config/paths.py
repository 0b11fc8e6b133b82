"""Where the shipped sweeps, search spaces and evaluation tasks live, and qsweep's cache.

A wheel carries them inside the package (qsweep/data/*); a source checkout or editable install
reads them from the repository's top-level folders, which are the originals.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def shipped(kind: str) -> Path:
    """kind is one of sweeps, search_spaces, evaluation."""
    packaged = Path(str(files("qsweep"))) / "data" / kind
    if packaged.exists():
        return packaged
    return Path(__file__).resolve().parents[3] / kind


def cache_dir() -> Path:
    """What qsweep builds once and reuses (embedded models, the offline MMLU): $QSWEEP_CACHE."""
    path = Path(os.environ.get("QSWEEP_CACHE", Path.home() / ".cache" / "qsweep"))
    path.mkdir(parents=True, exist_ok=True)
    return path
