"""Where a sweep writes: OUTPUT_DIR/NAME under the working directory must be creatable."""

from __future__ import annotations

import os
from pathlib import Path

from qsweep.config.paths import resolve_path


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing ancestor: where a later mkdir would start."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_output_dir(output_dir: str) -> list[str]:
    """Adapters and Ray state go to OUTPUT_DIR/NAME under the working directory: it must be creatable."""
    path = resolve_path(output_dir, Path.cwd())
    if path.exists() and not path.is_dir():
        return [f"output_dir: {path} is a file; choose a folder name"]
    start = nearest_existing(path)
    if not start.is_dir() or not os.access(start, os.W_OK | os.X_OK):
        return [f"output_dir: {path} cannot be created ({start} is not a writable folder); choose another folder"]
    return []
