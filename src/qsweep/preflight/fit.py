"""The fit check: the smallest trial the sweep can run must fit this machine's device.

Estimated from the model's config.json (resources.estimate), so a skeleton folder will do, and the
data's real token lengths (train.lengths: local files are read into memory, nothing is written).
"""

from __future__ import annotations

from pathlib import Path

from qsweep.config.schema import SweepConfig
from qsweep.search.space import SearchSpace
from qsweep.train.models import is_local_or_embedded


def check_fits(sweep: SweepConfig, space: SearchSpace | None, model_folder: Path) -> list[str]:
    from qsweep.resources.packing import DoesNotFit, check_fits, extreme_trials, sized_estimate, this_machine

    if not is_local_or_embedded(sweep.model.name, sweep.base_dir):
        return []  # a hub model's size is known only once it is downloaded, at run time
    machine = this_machine()
    smallest = extreme_trials(sweep, space, model_folder)["smallest"]
    try:
        check_fits(sized_estimate(smallest, sweep.base_dir, model_folder, machine.device), machine)
    except DoesNotFit as exc:
        return [f"resources: {exc}"]
    return []
