"""What `auto` means: the compute dtype and the optimizer a trial uses on a device.

Decided here once, for the trial that trains and for the estimate that sizes it, so the estimate
always counts the optimizer state and the activation dtype the trial really has. Both functions take
the device as an argument: the driver sizes trials for a device it may not have itself (a CPU-only
head with GPU workers).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

Device = Literal["cuda", "cpu"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def fastest_compute_dtype(device: Device) -> tuple[str, str]:
    """What `compute_dtype: auto` means on `device`: the fastest dtype it runs natively (a torch
    dtype name), and why.

    On a CPU, bf16 is only fast with AMX-BF16 tiles (measured: one QLoRA step of SmolLM2-135M NF4
    takes 0.87 s in bf16 vs 1.38 s in fp32 on one core of a Xeon with AMX). AVX512-BF16 alone has
    only dot-product instructions and elsewhere bf16 is emulated, slower than fp32.
    """
    if device == "cuda":
        import torch

        # Asked only where a card is present; a driver without one sizes for bf16 (same bytes as fp16).
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            choice = "float16", f"{torch.cuda.get_device_name()} has no bf16"
        else:
            choice = "bfloat16", "CUDA with bf16"
    elif "amx_bf16" in _cpu_flags():
        choice = "bfloat16", "the CPU has AMX-BF16"
    else:
        choice = "float32", "the CPU has no AMX-BF16, so bf16 would be emulated"
    logger.debug("compute_dtype auto on %s -> %s (%s)", device, *choice)
    return choice


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no AMX is assumed
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def compute_dtype_name(name: str, device: Device) -> str:
    return fastest_compute_dtype(device)[0] if name == "auto" else name


def optimizer_name(name: str, device: Device) -> str:
    """The transformers `optim` a trial trains with. `auto` is plain AdamW everywhere, torch's fused
    kernel on CUDA: LoRA's optimizer state is a few MiB, so paging it (bitsandbytes' paged AdamW)
    saves nothing, and its unified memory would sit outside both the per-process cap and the
    measured peak. A user can still name a paged or 8-bit optimizer explicitly."""
    if name != "auto":
        return name
    return "adamw_torch_fused" if device == "cuda" else "adamw_torch"
