"""Shared figure plumbing for the report's PNGs: a bare matplotlib Figure and a message image."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any


def figure(width: float, height: float) -> Any:
    # A bare Figure, not pyplot: no global state or GUI backend inside the driver process.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def message_plot(path: Path, title: str, message: str) -> Path:
    """An explanatory image in place of a plot that cannot be drawn, so the artifact says why."""
    fig = figure(6.4, 3.2)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, textwrap.fill(message, 60), ha="center", va="center", fontsize=11, transform=ax.transAxes)
    fig.savefig(path)
    return path
