"""The offline MMLU before any training: its data is there and sound, and it is scored 0-shot.

Also tells a sweep that names lm-eval's own `mmlu` on a machine told to stay off the hub that the
offline copy exists.
"""

from __future__ import annotations

from qsweep.config.schema import SweepConfig
from qsweep.evaluate import mmlu
from qsweep.preflight.evaluation import task_fields
from qsweep.preflight.hub import env_flag, hub_dataset_cached


def check_mmlu(sweep: SweepConfig) -> list[str]:
    problems = []
    named = task_fields(sweep)
    for field, tasks in named.items():
        if "mmlu" in tasks and env_flag("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") and not hub_dataset_cached("cais/mmlu"):
            problems.append(f"{field}: lm-eval's own 'mmlu' downloads cais/mmlu from the Hugging Face hub, "
                            f"which HF_HUB_OFFLINE/HF_DATASETS_OFFLINE rule out (and it is not cached); use "
                            f"'{mmlu.GROUP}' (the same task on a local copy of the test split)"
                            + (f" and metric {mmlu.GROUP}/acc" if field == "evaluation.tasks" else ""))
    offline = [field for field, tasks in named.items() if any(t in mmlu.task_names() for t in tasks)]
    if not offline:
        return problems
    if fewshot := mmlu.fewshot_problem([t for tasks in named.values() for t in tasks], sweep.evaluation.num_fewshot):
        problems.append(fewshot)
    if data := mmlu.data_problem():
        problems.append(f"{offline[0]}: {data}")
    return problems
