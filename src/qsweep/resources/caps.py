"""Capping a process to its memory share: the one place trials, baselines and the final stage do it.

A packed process that overruns its share must hit its own out-of-memory error, never a neighbour's.
On CUDA the cap is torch's per-process fraction of the card, which limits what torch's caching
allocator reserves (its segments, cached free blocks included): the CUDA context (driver state,
kernels, cuBLAS workspace) sits outside it. Ray's GPU share was sized as the reserved budget plus
that context (packing.resource_request; the context measured on this card once known, see
packing.cuda_context), so the cap is the share less the context; capping at the whole share would
let each of N packed trials overrun by a context. With limits.memory_mb set too, the smaller of the
two holds. Trial processes run with `expandable_segments:True` (allocator_settings), so reserved
memory stays close to what is allocated instead of fragmenting over variable batch shapes.
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


# torch reads the first; newer torch also reads the second (which then takes precedence for some keys).
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE = "expandable_segments"


def allocator_settings(environ: dict[str, str]) -> dict[str, str]:
    """The allocator setting a trial process starts with: the user's own (either variable), with
    `expandable_segments:True` added unless it already says how to use them. Segments that grow in
    place keep reserved memory (what the cap limits) close to allocated memory when batch shapes vary;
    with fixed-size segments the two drift apart by 10-40% and a trial hits its cap early."""
    for name in ALLOC_CONF_VARIABLES:
        if value := environ.get(name, "").strip():
            return {name: value if EXPANDABLE in value else f"{value},{EXPANDABLE}:True"}
    return {ALLOC_CONF_VARIABLES[0]: f"{EXPANDABLE}:True"}


def ray_gpu_share() -> float | None:
    """The GPU share Ray assigned to this process, None outside a Ray worker or without a GPU."""
    ray = sys.modules.get("ray")  # a process Ray did not start has not imported it: nothing assigned
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_assigned_resources().get("GPU") or None


def cuda_fraction(memory_mb: float | None, share: float | None, card_mb: float,
                  context_mb: float = CUDA_CONTEXT_MIB) -> float | None:
    """The fraction of the card a process may reserve: its Ray share less the context, `memory_mb`
    (limits.memory_mb) when that is smaller, None when neither applies (uncapped)."""
    fractions = [min(1.0, memory_mb / card_mb)] if memory_mb is not None else []
    if share:
        fractions.append(tensor_fraction(share, card_mb, context_mb))
    return min(fractions, default=None)


def cap_process(memory_mb: float | None, context_mb: float = CUDA_CONTEXT_MIB) -> None:
    """Caps this process: on CUDA at its Ray GPU share less `context_mb` (the context its request
    counted), or at `memory_mb` (limits.memory_mb) when smaller; on a CPU at `memory_mb`. Without
    either, the process is left uncapped."""
    import torch

    if torch.cuda.is_available():
        card_mb = torch.cuda.get_device_properties(0).total_memory / MIB
        fraction = cuda_fraction(memory_mb, ray_gpu_share(), card_mb, context_mb)
        if fraction is not None:
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
