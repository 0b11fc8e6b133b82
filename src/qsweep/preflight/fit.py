"""The fit check: the smallest trial the sweep can run must fit this machine's device; when the largest
cannot, that is said before the sweep starts (such trials are refused one by one when suggested).

Estimated from the model's config.json (resources.estimate), so a skeleton folder will do, and the
data's real token lengths (train.lengths: local files are read into memory, nothing is written).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qsweep.config.schema import SweepConfig
from qsweep.search.space import SearchSpace
from qsweep.train.models import is_local_or_embedded

if TYPE_CHECKING:
    from qsweep.resources.packing import Machine

logger = logging.getLogger(__name__)


def check_fits(sweep: SweepConfig, space: SearchSpace | None, model_folder: Path,
               machine: Machine | None = None) -> list[str]:
    """The problem of a sweep whose smallest trial cannot fit `machine` (this one by default)."""
    from qsweep.resources.packing import DoesNotFit, check_fits, extreme_trials, sized_estimate, this_machine

    if not is_local_or_embedded(sweep.model.name, sweep.base_dir):
        return []  # a hub model's size is known only once it is downloaded, at run time
    machine = machine or this_machine()
    extremes = extreme_trials(sweep, space, model_folder)
    try:
        check_fits(sized_estimate(extremes["smallest"], sweep.base_dir, model_folder, machine.device,
                                  machine.context_mb), machine)
    except DoesNotFit as exc:
        return [f"resources: {exc}"]
    try:
        check_fits(sized_estimate(extremes["largest"], sweep.base_dir, model_folder, machine.device,
                                  machine.context_mb), machine, "the largest trial the search space allows")
    except DoesNotFit as exc:
        logger.warning("%s. Trials that large are refused when suggested (each fails at once, before loading, "
                       "with its numbers) and the sweep goes on; narrow the search space to avoid them", exc)
    return []
