"""What the quickstart's MMLU guard adds to a trial's scoring, side by side in one run.

Scores the untuned embedded model, 4-bit as the quickstart quantizes it, on one thread as a
quickstart trial runs: zorble alone (20 items) vs zorble + mmlu_offline (1 question per subject).
Prints JSON with both times and their ratio; writes bench/results/mmlu_guard_cpu.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qsweep.config.paths import shipped

OUT = Path(__file__).resolve().parent / "results" / "mmlu_guard_cpu.json"


def main() -> None:
    import torch

    from qsweep.config.schema import load_sweep
    from qsweep.evaluate.harness import score
    from qsweep.train.models import resolve_model
    from qsweep.train.trial import load_base

    torch.set_num_threads(1)
    sweep = load_sweep(shipped("sweeps") / "quickstart.yaml")
    trial = sweep.trial()
    model, tokenizer = load_base(resolve_model(trial.model.name).path, trial.quantization, False)
    timings = {}
    # The guard is scored in the final stage (evaluation.final), on its items.
    guard = trial.evaluation.final
    for label, tasks in (("zorble", ["zorble"]), ("zorble+mmlu", [*trial.evaluation.tasks, *guard.tasks])):
        evaluation = trial.evaluation.model_copy(update={"tasks": tasks, "per_subject": guard.per_subject})
        score(model, tokenizer, evaluation, sweep.base_dir, trial.quantization)  # warm: dataset and index loads once per process
        tick = time.perf_counter()
        result = score(model, tokenizer, evaluation, sweep.base_dir, trial.quantization)
        timings[label] = {"seconds": round(time.perf_counter() - tick, 1),
                          "items": sum(len(v) for v in result.samples.values()),
                          "scores": {k: v for k, v in result.scores.items() if k.split("/")[0] in tasks}}
    figures = {
        "setup": "untuned smollm2-135m, nf4 4-bit, 1 thread (a quickstart trial), per_subject 1 + zorble limit 20",
        **timings,
        "extra_seconds": round(timings["zorble+mmlu"]["seconds"] - timings["zorble"]["seconds"], 1),
        "ratio": round(timings["zorble+mmlu"]["seconds"] / timings["zorble"]["seconds"], 2),
        "machine": f"{os.cpu_count()} CPU cores, no GPU, shared with six other processes (under load)",
    }
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
