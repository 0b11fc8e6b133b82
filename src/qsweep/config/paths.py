"""Paths: where the shipped sweeps, search spaces and evaluation tasks live, relative-path resolution,
and qsweep's cache.

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


def resolve_path(value: str | Path, base_dir: Path) -> Path:
    """`~` expanded; a relative path is relative to base_dir (the sweep file's folder, or the working
    directory for what the docs say is relative to it), absolute and normalised."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def existing_path(value: str | Path, base_dir: Path | None) -> Path:
    """A model path as the user means it: next to the sweep file when it exists there, else as
    written (relative to the working directory). `~` expanded; not resolved."""
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        return base_dir / path
    return path


def cache_root() -> Path:
    """Where qsweep caches models, hashes, calibration and the offline MMLU ($QSWEEP_CACHE); not
    created (readers must not write)."""
    return Path(os.environ.get("QSWEEP_CACHE", Path.home() / ".cache" / "qsweep"))


def cache_dir() -> Path:
    """The cache folder, created: for what qsweep builds once and reuses."""
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path
