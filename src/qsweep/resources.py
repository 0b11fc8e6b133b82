"""What one trial asks Ray for: CPUs on a CPU machine, a share of a GPU on a GPU machine."""

from __future__ import annotations

from qsweep.config import SweepConfig

# Until trials are packed by their own memory estimate, a GPU is shared by this many trials.
DEFAULT_TRIALS_PER_GPU = 4


def trial_resources(sweep: SweepConfig) -> dict[str, float]:
    import torch

    wanted = sweep.resources.gpus_per_trial
    if wanted == "auto":
        wanted = 1 / DEFAULT_TRIALS_PER_GPU if torch.cuda.is_available() else 0.0
    resources = {"cpu": sweep.resources.cpus_per_trial}
    if wanted:
        resources["gpu"] = float(wanted)
    return resources
