"""What the CUDA driver knows and torch's allocator does not: a process's whole footprint on its card
(NVML), and whether an NVIDIA MPS control daemon lets packed processes run kernels side by side.

Both answers are None/False where they cannot be had (no driver, no `nvidia-ml-py`, a container that
hides the host's process ids), never an error: they are measurements to log, not requirements.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from qsweep.resources.estimate import MIB

logger = logging.getLogger(__name__)

# NVIDIA's documented default when CUDA_MPS_PIPE_DIRECTORY is unset.
MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"


def process_footprint_mb(device: int) -> float | None:
    """This process's memory on CUDA device `device` (torch's index) as NVML reports it: the CUDA
    context, libraries' workspaces and everything torch's allocator reserved. None when NVML cannot
    tell: `nvidia-ml-py` absent, no driver, or this process not in the card's list (a container with
    its own process ids, or an MPS client whose memory NVML does not list)."""
    try:
        import pynvml
    except ImportError:
        return None
    import torch

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        # torch's own mapping of its index to NVML's, through CUDA_VISIBLE_DEVICES (list_gpu_processes uses it).
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except (pynvml.NVMLError, RuntimeError, AttributeError) as exc:
        logger.debug("NVML could not list the processes on device %d: %s", device, exc)
        return None
    finally:
        pynvml.nvmlShutdown()
    used = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory]
    return used[0] / MIB if used else None


def mps_pipe_directory() -> Path:
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DIRECTORY)


def mps_running() -> bool:
    """Whether an MPS control daemon serves this machine's CUDA processes: CUDA connects each new
    context to the daemon's `control` socket in the pipe directory, so this process can connect to it
    exactly when its own CUDA would. A socket file left by a killed daemon refuses the connection."""
    control = mps_pipe_directory() / "control"
    try:
        if not stat.S_ISSOCK(control.stat().st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(str(control))
    except OSError:
        return False
    return True
