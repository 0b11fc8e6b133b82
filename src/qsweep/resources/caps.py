"""Capping a process to its memory share: the one place trials, baselines and the final stage do it.

A packed process that overruns its share must hit its own out-of-memory error, never a neighbour's.
On CUDA the cap is torch's per-process fraction of the card, which counts tensors only: the CUDA
context (driver state, kernels, cuBLAS workspace) sits outside it. Ray's GPU share was sized as the
tensors' budget plus that context (packing.resource_request), so the cap is the share less the
context; capping at the whole share would let each of N packed trials overrun by a context.
On a CPU the cap is the data segment limit (RLIMIT_DATA), set only for an explicit limits.memory_mb.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from qsweep.resources.estimate import CUDA_CONTEXT_MIB, MIB


def tensor_fraction(share: float, card_mb: float, context_mb: float = CUDA_CONTEXT_MIB) -> float:
    """The fraction of a `card_mb` card that a process's tensors may use when Ray gave it `share`
    of the card and the estimate counted `context_mb` of it as CUDA context."""
    room = share * card_mb - context_mb
    if room <= 0:
        raise ValueError(
            f"a GPU share of {share:g} of a {card_mb:,.0f} MiB card is {share * card_mb:,.0f} MiB, no more than the "
            f"CUDA context ({context_mb:,.0f} MiB): raise resources.gpus_per_trial or leave it at auto"
        )
    return min(1.0, room / card_mb)


def ray_gpu_share() -> float | None:
    """The GPU share Ray assigned to this process, None outside a Ray worker or without a GPU."""
    ray = sys.modules.get("ray")  # a process Ray did not start has not imported it: nothing assigned
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_assigned_resources().get("GPU") or None


def cap_process(memory_mb: float | None) -> None:
    """Caps this process: at `memory_mb` of tensors when given (limits.memory_mb), else on CUDA at
    its Ray GPU share less the context. Without either, the process is left uncapped."""
    import torch

    if torch.cuda.is_available():
        card_mb = torch.cuda.get_device_properties(0).total_memory / MIB
        share = ray_gpu_share()
        if memory_mb is not None:
            fraction = min(1.0, memory_mb / card_mb)
        elif share:
            fraction = tensor_fraction(share, card_mb)
        else:
            return
        torch.cuda.set_per_process_memory_fraction(fraction)
        return
    if memory_mb is None:
        return
    # RLIMIT_DATA above what the process already uses makes a too-large allocation fail with
    # "can't allocate memory" instead of waking the kernel's OOM killer.
    in_use = int(Path("/proc/self/statm").read_text().split()[5]) * resource.getpagesize()
    limit = in_use + int(memory_mb * MIB)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def release_cap() -> None:
    """Lifts the cap again: a process that hit it can still report its own failure, and the next
    trial or task Ray gives this worker process starts uncapped (it sets its own cap)."""
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.set_per_process_memory_fraction(1.0)


def give_back_memory() -> None:
    """Returns what a finished trial freed, so the next trial in this worker process starts from the
    same footing as in a fresh one: its CPU peak (growth of the resident set) and its cap count its
    own memory, not heap pages glibc kept from the last trial, and CUDA's cache goes back to the card."""
    import ctypes
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        # glibc keeps freed heap pages resident; nothing in Python or torch hands them back.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
