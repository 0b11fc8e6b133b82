"""The offline MMLU before any training: its data is there and sound, and it is scored 0-shot.

Also tells a sweep that names lm-eval's own `mmlu` on a machine told to stay off the hub that the
offline copy exists.
"""

from __future__ import annotations

import os

from qsweep.config.schema import SweepConfig
from qsweep.evaluate import mmlu

TRUTHY = {"1", "on", "yes", "true"}


def _hub_offline() -> bool:
    return any(os.environ.get(n, "").strip().lower() in TRUTHY for n in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def check_mmlu(sweep: SweepConfig) -> list[str]:
    tasks = sweep.evaluation.tasks
    problems = []
    if _hub_offline() and "mmlu" in tasks:
        problems.append(f"evaluation.tasks: lm-eval's own 'mmlu' downloads cais/mmlu from the Hugging Face hub, "
                        f"which HF_HUB_OFFLINE/HF_DATASETS_OFFLINE rule out; use '{mmlu.GROUP}' (the same "
                        f"task on a local copy of the test split) and metric {mmlu.GROUP}/acc")
    if not any(t in mmlu.task_names() for t in tasks):
        return problems
    if fewshot := mmlu.fewshot_problem(tasks, sweep.evaluation.num_fewshot):
        problems.append(fewshot)
    if data := mmlu.data_problem():
        problems.append(f"evaluation.tasks: {data}")
    return problems
