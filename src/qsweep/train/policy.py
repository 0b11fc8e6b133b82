"""What `auto` means: the compute dtype and the optimizer a trial uses on a device.

Decided here once, for the trial that trains and for the estimate that sizes it, so the estimate
always counts the optimizer state and the activation dtype the trial really has. Both functions take
the device as an argument: the driver sizes trials for a device it may not have itself (a CPU-only
head with GPU workers).
"""

from __future__ import annotations

from typing import Literal

Device = Literal["cuda", "cpu"]


def auto_compute_dtype(device: Device) -> str:
    """The compute dtype `auto` resolves to on `device` (a torch dtype name)."""
    if device == "cuda":
        import torch

        # Asked only where a card is present; a driver without one sizes for bf16 (same bytes as fp16).
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return "float16"
        return "bfloat16"
    # Without AMX, bf16 matmuls on a CPU are emulated and slower than fp32.
    return "float32"


def compute_dtype_name(name: str, device: Device) -> str:
    return auto_compute_dtype(device) if name == "auto" else name


def optimizer_name(name: str, device: Device) -> str:
    """The transformers `optim` a trial trains with. `auto` is plain AdamW everywhere, torch's fused
    kernel on CUDA: LoRA's optimizer state is a few MiB, so paging it (bitsandbytes' paged AdamW)
    saves nothing, and its unified memory would sit outside both the per-process cap and the
    measured peak. A user can still name a paged or 8-bit optimizer explicitly."""
    if name != "auto":
        return name
    return "adamw_torch_fused" if device == "cuda" else "adamw_torch"
