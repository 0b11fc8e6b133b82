"""Paths: where the shipped sweeps, search spaces and evaluation tasks live, and relative-path resolution.

A wheel carries them inside the package (qsweep/data/*); a source checkout or editable install
reads them from the repository's top-level folders, which are the originals.
"""

from __future__ import annotations

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
