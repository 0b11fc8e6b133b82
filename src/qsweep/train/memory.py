"""A trial's memory as measured: the training peak the way the cap limits it and the estimate counts
it, and the bytes a model's tensors hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qsweep.resources.caps import give_back_memory
from qsweep.resources.gpu import process_footprint_mb


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def tensor_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer, 4-bit storage and its quantization state included."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                         if isinstance(v, torch.Tensor))
    return total


class PeakMemory:
    """The training peak, measured like the cap limits it and the estimator counts it (so the two
    can be compared).

    On CUDA: the peak of what torch's caching allocator reserved (`peak_memory_mb`, what the
    per-process cap limits; `peak_reserved_mb` too), the peak allocated beside it, and the process's
    whole footprint on the card as NVML sees it with the CUDA context it implies (footprint less
    what is reserved at that moment), when NVML can tell (resources.gpu).
    On a CPU, ru_maxrss would be dominated by the interpreter and its libraries (~550 MiB) and by
    transient copies while loading, so the peak resident set is reset once the model is in memory
    and the model's own tensor bytes are added to its growth from there.
    """

    def __init__(self, model: Any):
        self.model_bytes = tensor_bytes(model)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        give_back_memory()  # else training reuses what loading freed unseen (one config read 770-1,060 MiB)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.rss_kb = _proc_status_kb("VmRSS")

    def mb(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_reserved() / 2**20
        growth = max(0, _proc_status_kb("VmHWM") - self.rss_kb) * 1024
        return (self.model_bytes + growth) / 2**20

    def measures(self) -> dict[str, float]:
        """The metrics a trial logs: `peak_memory_mb` everywhere, and on CUDA `peak_reserved_mb`,
        `peak_allocated_mb`, and `process_footprint_mb` / `cuda_context_mb` when NVML can tell."""
        measured = {"peak_memory_mb": self.mb()}
        if not torch.cuda.is_available():
            return measured
        measured["peak_reserved_mb"] = measured["peak_memory_mb"]
        measured["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        device = torch.cuda.current_device()
        footprint = process_footprint_mb(device)
        if footprint is not None:
            measured["process_footprint_mb"] = footprint
            measured["cuda_context_mb"] = footprint - torch.cuda.memory_reserved(device) / 2**20
        return measured
