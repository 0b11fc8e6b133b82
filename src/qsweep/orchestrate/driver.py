"""The driver's own plumbing: Ray brought up beside the driver's other work and stopped as soon as
nothing needs it, and the timing of each phase of a sweep."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from qsweep.resources.caps import allocator_settings

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def timed_phase(name: str) -> Iterator[None]:
    """Logs how long a phase of the sweep took: where the time goes (bench/anchor.py reads these)."""
    started = time.perf_counter()
    yield
    logger.info("phase %s took %.1f s", name, time.perf_counter() - started)


class RayStart:
    """Ray coming up in a thread: `ready()` waits for it, `stop()` shuts down the Ray this start
    brought up (a library caller's Ray is left as it was). Stopping is done from the main thread: a
    driver whose Ray was shut down from another thread was later ended by Ray's core worker (exit
    status 1, no atexit) when the next Ray started in that process."""

    def __init__(self, starting: Future) -> None:
        self.starting = starting
        self.stopped = False

    def ready(self) -> bool:
        return self.starting.result()

    def stop(self) -> None:
        import ray

        if self.stopped:
            return
        self.stopped = True
        # Waits for a start still under way: Ray is never left half started.
        if self.starting.exception() is None and self.starting.result():
            with timed_phase("ray_shutdown"):
                ray.shutdown()


@contextlib.contextmanager
def ray_started_beside(address: str | None) -> Iterator[RayStart]:
    """Starts Ray in a thread while the caller sets up MLflow, instead of after: Ray's processes take
    2.5-3.5 s to come up on two cores. Ray is stopped at the latest on leaving."""
    if threading.current_thread() is threading.main_thread():
        # What ray.init does in the main thread only: SIGTERM exits through the finally blocks that
        # shut Ray down and close the sweep's MLflow runs.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    with ThreadPoolExecutor(1, thread_name_prefix="ray-start") as pool:
        start = RayStart(pool.submit(connect_ray, address))
        try:
            yield start
        finally:
            start.stop()


def connect_ray(address: str | None) -> bool:
    """Joins the cluster at `address` or starts a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    started = time.perf_counter()
    ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        # Set before a trial's torch starts CUDA (see resources.caps).
        **allocator_settings(dict(os.environ)),
        # glibc otherwise keeps freed tensor memory in the heap: RSS (and the CPU cap) would grow
        # by what was freed, not by what is in use. Blocks of 4 MiB and more (logits, weights) are
        # mmapped and go back when freed; mmapping smaller ones too (activations) made a training
        # step 1.7x slower (SmolLM2-135M, batch 8: 1.9 s at a 128 KiB threshold vs 1.1 s at 4 MiB).
        "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20),
    }})
    logger.info("ray started in %.1f s", time.perf_counter() - started)
    return True
