"""What a sweep records about its trials sharing a GPU: whether an NVIDIA MPS daemon lets them run
kernels side by side (a tag on the parent run and a line in the sweep log), and the CUDA context each
trial measured (stored per card, for the estimates of later sweeps)."""

from __future__ import annotations

import logging
from typing import Any

from qsweep import tracking
from qsweep.resources.gpu import mps_pipe_directory, mps_running
from qsweep.resources.packing import Machine, save_cuda_contexts

logger = logging.getLogger(__name__)

MPS_TAG = "qsweep.mps"


def log_gpu_sharing(uri: str, parent_run_id: str, machine: Machine) -> None:
    """Says how the trials share the card: their sizes, the context counted for each, and whether MPS
    runs on this node. Without MPS, packed processes take turns on the GPU (time slices), so
    compute-bound trials gain little from packing beyond using memory that would sit idle."""
    if machine.device != "cuda":
        tracking.log_batch(tracking.client(uri), parent_run_id, tags={MPS_TAG: "n/a (cpu)"})
        return
    running = mps_running()
    logger.info("trials are packed on %s cards of %.0f MiB, each counting a %.0f MiB CUDA context",
                machine.card or "CUDA", machine.memory_mb, machine.context_mb)
    if running:
        logger.info("NVIDIA MPS: a control daemon runs (%s): packed trials run their kernels side by side",
                    mps_pipe_directory())
    else:
        logger.warning("NVIDIA MPS: no control daemon runs (%s): packed trials time-slice the GPU, so compute-bound "
                       "trials gain little from packing; start one with `nvidia-cuda-mps-control -d` (see README)",
                       mps_pipe_directory())
    tracking.log_batch(tracking.client(uri), parent_run_id, tags={MPS_TAG: "running" if running else "not running"})


def record_cuda_contexts(results: list[dict[str, Any]]) -> None:
    """Stores the CUDA context each trial measured (`cuda_context_mb`), per card, where later
    estimates on that card read it (resources.packing.cuda_context). `results`: trials' last results."""
    measured: dict[str, list[float]] = {}
    for result in results:
        context = (result.get("measures") or {}).get("cuda_context_mb")
        card = (result.get("provenance") or {}).get("device")
        if context is not None and card:
            measured.setdefault(card, []).append(float(context))
    if path := save_cuda_contexts(measured):
        logger.info("CUDA context measured by the trials, per card (MiB): %s; stored in %s for later estimates",
                    {card: round(max(values)) for card, values in measured.items()}, path)
