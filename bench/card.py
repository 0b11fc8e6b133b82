"""The card and the processes on it, as the benches see them without touching CUDA: GPU memory
through NVML (nvidia-ml-py), host memory on a CPU, child processes that can be stopped with all they
started, and NVIDIA MPS's control daemon started and stopped for one run.

A bench process that sampled the card with torch would hold a CUDA context on the card it measures
(issue 19, item 5); NVML holds none. Imported by bench/packing.py and bench/gpu_proof.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class Card:
    """GPU 0 through NVML (nvidia-ml-py): its name and memory, and each process's memory on it."""

    def __init__(self) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def name(self) -> str:
        name = self.nvml.nvmlDeviceGetName(self.handle)
        return name.decode() if isinstance(name, bytes) else name

    def used_and_total(self) -> tuple[float, float]:
        info = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return float(info.used), float(info.total)

    def processes_mb(self) -> dict[int, float | None]:
        """pid -> MiB that process holds on the card (None where the driver does not say, e.g. MPS)."""
        found = {}
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            used = proc.usedGpuMemory
            found[proc.pid] = None if used is None or used >= 2**63 else used / 2**20
        return found


def open_card(gpu: bool) -> Card | None:
    return Card() if gpu else None


def host_used_and_total() -> tuple[float, float]:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(info["MemTotal"].split()[0]) * 1024
    return total - int(info["MemAvailable"].split()[0]) * 1024, total


class MemorySampler(threading.Thread):
    """Samples memory in use every 0.5 s: the card's and each GPU process's through NVML, or the
    host's (MemAvailable) on a CPU."""

    def __init__(self, card: Card | None):
        super().__init__(daemon=True)
        self.card, self.stop = card, threading.Event()
        self.used: list[float] = []
        self.process_peaks: dict[int, float | None] = {}
        self.most_processes = 0

    def used_and_total(self) -> tuple[float, float]:
        return self.card.used_and_total() if self.card else host_used_and_total()

    def run(self) -> None:
        while not self.stop.is_set():
            self.used.append(self.used_and_total()[0])
            if self.card:
                processes = self.card.processes_mb()
                self.most_processes = max(self.most_processes, len(processes))
                for pid, mb in processes.items():
                    before = self.process_peaks.get(pid)
                    self.process_peaks[pid] = mb if before is None else max(before, mb or 0.0)
            time.sleep(0.5)


def run_child(command: list[str], timeout_s: float, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs a command in its own session, killed with all it started when it outlives `timeout_s`."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=max(1.0, timeout_s))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            output, _ = child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
        timed_out = True
    return {"exit_code": child.returncode, "timed_out": timed_out, "seconds": time.perf_counter() - started,
            "output": output or "", "pid": child.pid}




def settle(card: Card | None, ignore: set[int], wait_s: float = 30.0) -> list[int]:
    """Waits until no process but `ignore` (the MPS server) holds the card; kills what is left after
    `wait_s` (processes of a sweep this bench started and stopped), so the next run starts on an
    empty card. Returns the pids it had to kill."""
    if card is None:
        return []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not set(card.processes_mb()) - ignore:
            return []
        time.sleep(1)
    left = sorted(set(card.processes_mb()) - ignore)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


# The daemon's log folder (its default, /var/log/nvidia-mps, may not exist on a bare machine); the
# pipe folder stays the default /tmp/nvidia-mps, where CUDA clients and qsweep's MPS check look.
MPS_LOG = Path(tempfile.gettempdir()) / "qsweep-mps-log"


def mps_control(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    MPS_LOG.mkdir(exist_ok=True)
    return subprocess.run(["nvidia-cuda-mps-control", *args], input=stdin, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "CUDA_MPS_LOG_DIRECTORY": str(MPS_LOG)})


def mps_log_tail() -> str:
    logs = [MPS_LOG / "control.log", MPS_LOG / "server.log"]
    return " | ".join(p.read_text()[-300:] for p in logs if p.exists())


def start_mps() -> str | None:
    """Starts the MPS control daemon and checks that a CUDA process can run under it; None when
    it runs, else why not (the daemon is stopped again)."""
    if shutil.which("nvidia-cuda-mps-control") is None:
        return "nvidia-cuda-mps-control is not on PATH"
    try:
        started = mps_control("-d")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-cuda-mps-control -d: {exc}"
    if started.returncode != 0:
        return f"nvidia-cuda-mps-control -d exited {started.returncode}: {(started.stderr or started.stdout)[-500:]}"
    probe = run_child([sys.executable, "-c", "import torch; print(torch.ones(1, device='cuda').sum().item())"], 120)
    if probe["exit_code"] != 0:
        why = f"a CUDA process failed under MPS: {probe['output'][-500:]} (MPS log: {mps_log_tail()})"
        stop_mps()
        return why
    return None


def stop_mps() -> None:
    try:
        mps_control(stdin="quit\n")
    except (OSError, subprocess.TimeoutExpired):
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and mps_processes():
        time.sleep(0.5)


def mps_processes() -> list[int]:
    """The MPS control daemon's and server's pids (both named nvidia-cuda-mps-*)."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith("nvidia-cuda-mps"):
                found.append(int(comm.parent.name))
        except OSError:
            continue
    return found
