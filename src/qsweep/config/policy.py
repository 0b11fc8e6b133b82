"""What `auto` means: the compute dtype and the optimizer a trial uses on a device, and the dtype
every model is scored in.

Decided here once, for the trial that trains and for the estimate that sizes it, so the estimate
always counts the optimizer state and the activation dtype the trial really has, and for every
scoring (trials, the untuned base, the final stage, `qsweep reproduce`), so that a trial and its
baseline are scored alike. The functions take the device as an argument: the driver sizes trials for
a device it may not have itself (a CPU-only head with GPU workers). The card itself (cuda_card) is
read without starting CUDA in the process that asks, so the driver never holds GPU memory of its own.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Literal, NamedTuple

Device = Literal["cuda", "cpu"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def fastest_compute_dtype(device: Device) -> tuple[str, str]:
    """What `compute_dtype: auto` means on `device`: the fastest dtype it runs natively (a torch
    dtype name), and why.

    On a CPU, bf16 is fast with AMX-BF16 tiles (measured: one QLoRA step of SmolLM2-135M NF4 takes
    0.87 s in bf16 vs 1.38 s in fp32 on one core of a Xeon with AMX) and with AVX512-BF16's dot
    products (measured on a 2-core AMD EPYC without AMX, one thread, alternating runs: 10 quickstart
    steps 28-29 s in bf16 vs 34-37 s in fp32, zorble's 20 items scored in 8.0 s vs 9.5-10.6 s, the
    57-question MMLU guard in 25.9 vs 40.0 CPU seconds). Elsewhere bf16 is emulated, slower than fp32.
    """
    if device == "cuda":
        # Asked only where a card is present; a driver without one sizes for bf16 (same bytes as fp16).
        # bf16 is native from compute capability 8 (Ampere) on; older cards would emulate it.
        card = cuda_card()
        if card is not None and card.major < 8:
            choice = "float16", f"{card.name} has no bf16"
        else:
            choice = "bfloat16", "CUDA with bf16"
    elif "amx_bf16" in (flags := _cpu_flags()):
        choice = "bfloat16", "the CPU has AMX-BF16"
    elif "avx512_bf16" in flags:
        choice = "bfloat16", "the CPU has AVX512-BF16"
    else:
        choice = "float32", "the CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 would be emulated"
    logger.debug("compute_dtype auto on %s -> %s (%s)", device, *choice)
    return choice


class CudaCard(NamedTuple):
    name: str
    memory_mb: float
    major: int  # compute capability


# Run in a child process: torch's view of the first visible card, without starting CUDA here.
_CARD_PROBE = ("import json, torch; p = torch.cuda.get_device_properties(0); "
               "print(json.dumps([p.name, p.total_memory / 2**20, p.major]))")


@functools.lru_cache(maxsize=1)
def cuda_card() -> CudaCard | None:
    """The first CUDA card this process sees, as torch describes it; None without one. Read in a
    child process unless this process has started CUDA already: the sweep's driver, validation and
    `qsweep estimate` only size trials, and a CUDA context started in the driver would hold memory on
    the card outside every trial's share for the whole sweep."""
    import torch

    if not torch.cuda.is_available():  # asks the driver for a device count; starts no context
        return None
    if torch.cuda.is_initialized():
        properties = torch.cuda.get_device_properties(0)
        return CudaCard(properties.name, properties.total_memory / 2**20, properties.major)
    probe = subprocess.run([sys.executable, "-c", _CARD_PROBE], capture_output=True, text=True, check=True)
    return CudaCard(*json.loads(probe.stdout.strip().splitlines()[-1]))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no AMX is assumed
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def compute_dtype_name(name: str, device: Device) -> str:
    return fastest_compute_dtype(device)[0] if name == "auto" else name


def scoring_dtype(compute_dtype: str, device: Device) -> str:
    """The dtype lm-eval scores a model under (torch.autocast; float32 = no autocast): the compute
    dtype, for the untuned base and every adapter alike.

    Scoring is forward passes only, so it gains from bf16 what training does (AMX tiles on a CPU,
    tensor cores on CUDA) and the unquantized layers (the vocabulary head, attention) no longer run as
    fp32 matmuls. Both sides of every comparison are scored the same way, and the dtype is part of the
    evaluation cache's key, so a score is never compared with one taken at another precision.
    tests/test_scoring_dtype.py shows bf16 and fp32 scores agree within their stderr.
    """
    return compute_dtype_name(compute_dtype, device)


def optimizer_name(name: str, device: Device) -> str:
    """The transformers `optim` a trial trains with. `auto` is plain AdamW everywhere, torch's fused
    kernel on CUDA: LoRA's optimizer state is a few MiB, so paging it (bitsandbytes' paged AdamW)
    saves nothing, and its unified memory would sit outside both the per-process cap and the
    measured peak. A user can still name a paged or 8-bit optimizer explicitly."""
    if name != "auto":
        return name
    return "adamw_torch_fused" if device == "cuda" else "adamw_torch"
