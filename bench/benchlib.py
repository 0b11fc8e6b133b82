"""What every bench here shares: the machine's name for its results, and how results are written.

Imported as a sibling module: the benches run as scripts (`python bench/anchor.py`), so their folder
is first on sys.path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


def machine() -> str:
    """The GPU's name, or the CPU's model name and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    names = re.findall(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return f"{names[0] if names else 'cpu'} ({os.cpu_count()} cores)"


def emit(report: dict[str, Any], out: Path | None) -> None:
    """Prints the report as JSON, and writes it to `out` too when given."""
    text = json.dumps(report, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
