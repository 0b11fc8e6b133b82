"""Evaluation vs. training time per trial in the quickstart sweep: a hand-wired scorer vs. qsweep's.

Prints JSON from one run, both ways scoring the same trained adapter on the same items:
  before  what a hand-wired script does per trial, in a fresh process: build lm-eval's default
          TaskManager (the full built-in index), reload the 4-bit base + adapter from disk, score
          with batch_size=1;
  after   qsweep.evaluate.harness.score inside the trial, on the model already in memory (task index
          cached per process, auto batch size); a second call is timed too. The quickstart scores a
          local task only, so qsweep builds the local-only index (~0.1 ms) and never the default one.
The ratios (eval/train before and after, before/after eval) are what to compare, never the seconds.

    python bench/eval.py                 # the quickstart's trial as written (40 steps); ~2 min on 2 CPU cores
    python bench/eval.py --steps 20      # cut short
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "sweeps" / "quickstart.yaml"


def loglikelihoods(samples: dict[str, list[dict]]) -> dict[str, dict[int, list[float]]]:
    """Per task, per doc id, each choice's log-likelihood: compared item by item, not just as acc."""
    return {task: {int(s["doc_id"]): s["loglikelihoods"] for s in items} for task, items in samples.items()}


def before(adapter: Path, items: dict[str, list[int]]) -> dict[str, Any]:
    """The naive per-trial scorer, run in a fresh process so nothing is cached. Prints its parts."""
    started = time.perf_counter()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel

    from qsweep.config.schema import load_sweep
    from qsweep.evaluate.harness import _sample_record, include_dirs, task_specs
    from qsweep.train.models import resolve_model
    from qsweep.train.trial import load_base

    torch.set_num_threads(1)
    imports = time.perf_counter() - started

    sweep = load_sweep(SWEEP)
    evaluation = sweep.evaluation
    # The local task's config with its data path resolved: the same task qsweep scores, so only
    # the three changes under test differ (index, reload, batch size).
    specs = task_specs(evaluation.tasks, include_dirs(evaluation.include_path, sweep.base_dir))

    tick = time.perf_counter()
    manager = TaskManager()  # the default: indexes every built-in task
    index = time.perf_counter() - tick

    tick = time.perf_counter()
    base, tokenizer = load_base(resolve_model(sweep.model.name, sweep.model.revision, sweep.base_dir).path,
                                sweep.quantization, sweep.model.trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    reload = time.perf_counter() - tick

    tick = time.perf_counter()
    raw = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1),
        tasks=specs, num_fewshot=evaluation.num_fewshot, samples=items, task_manager=manager,
        log_samples=True, bootstrap_iters=1000,  # as qsweep, so bootstrap cost is not part of the diff
    )
    scoring = time.perf_counter() - tick
    task = evaluation.tasks[0]
    return {
        "imports_seconds": imports, "index_seconds": index, "reload_seconds": reload,
        "scoring_seconds": scoring, "batch_size": 1,
        # Imports are left out: the training process paid them too.
        "eval_seconds": index + reload + scoring,
        "acc": raw["results"][task]["acc,none"],
        "loglikelihoods": loglikelihoods({t: [_sample_record(s) for s in v] for t, v in raw["samples"].items()}),
    }


def after_and_train(steps: int | None, out_dir: Path) -> tuple[dict[str, Any], Any, float, int]:
    """Runs the quickstart's base trial through qsweep.trial.run_trial; its score() calls are timed
    by a wrapper that also keeps the in-memory model, so a second call can be timed after it."""
    import torch

    import qsweep.train.trial
    from qsweep.config.schema import load_sweep
    from qsweep.evaluate.harness import auto_batch_size, score, task_manager

    torch.set_num_threads(1)
    sweep = load_sweep(SWEEP)
    trial = sweep.trial()
    if steps is not None:
        trial.training.max_steps = steps
        trial.training.eval_every = min(trial.training.eval_every, steps)

    calls: list[dict[str, Any]] = []

    def timed_score(model: Any, tokenizer: Any, evaluation: Any, base_dir: Path, stage: Any = None) -> Any:
        tick = time.perf_counter()
        result = score(model, tokenizer, evaluation, base_dir, stage)
        calls.append({"seconds": time.perf_counter() - tick, "result": result, "model": model, "tokenizer": tokenizer})
        return result

    # The index qsweep builds for a sweep of local tasks only (cached by lru_cache for the process);
    # lm_eval.tasks is imported first so that its import is not counted as indexing.
    import lm_eval.tasks  # noqa: F401

    task_manager.cache_clear()
    tick = time.perf_counter()
    task_manager(False)
    index = time.perf_counter() - tick

    qsweep.train.trial.score = timed_score  # instrument the exact run_trial path, no copy of it
    outcome = qsweep.train.trial.run_trial(trial, sweep.base_dir, out_dir, report=lambda _: None)
    first = calls[0]
    timed_score(first["model"], first["tokenizer"], trial.evaluation, sweep.base_dir)
    second = calls[1]
    assert second["result"].scores == first["result"].scores, "the same model scored twice differently"
    after = {
        "index_seconds": index,
        "first_call_seconds": first["seconds"],
        "second_call_seconds": second["seconds"],
        "batch_size": auto_batch_size(first["model"]),
        "eval_seconds": index + first["seconds"],
        "acc": first["result"].scores[f"{trial.evaluation.tasks[0]}/acc"],
        "loglikelihoods": loglikelihoods(first["result"].samples),
    }
    return after, first["result"].items, outcome.metrics["train_seconds"], trial.training.max_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the sweep's, 40)")
    parser.add_argument("--before", nargs=2, metavar=("ADAPTER", "ITEMS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.before:  # the child process of the "before" side
        print(json.dumps(before(Path(args.before[0]), json.loads(args.before[1]))))
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="qsweep-bench-eval-") as tmp:
        # The Trainer prints its logs to stdout; they go to stderr so that stdout is the JSON alone.
        with contextlib.redirect_stdout(sys.stderr):
            after, items, train_seconds, steps = after_and_train(args.steps, Path(tmp))
        # One heavy process at a time: the child runs while this one only waits.
        child = subprocess.run([sys.executable, __file__, "--before", str(Path(tmp) / "adapter"), json.dumps(items)],
                               capture_output=True, text=True, cwd=REPO, env=os.environ)
        if child.returncode != 0:
            sys.exit(f"the 'before' process failed:\n{child.stderr[-4000:]}")
        naive = json.loads(child.stdout.strip().splitlines()[-1])

    # Same model, same items: the per-item log-likelihoods say whether a score difference is real.
    lls_before, lls_after = naive.pop("loglikelihoods"), after.pop("loglikelihoods")
    diffs = [abs(a - b) for task, docs in lls_after.items() for doc, row in docs.items()
             for a, b in zip(row, lls_before[task][str(doc)])]
    acc_before, acc_after = naive.pop("acc"), after.pop("acc")
    print(json.dumps({
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, 1 thread)",
        "model": load_model_name(),
        "steps": steps,
        "items": sum(len(v) for v in items.values()) if items else None,
        "train_seconds": train_seconds,
        "before": naive,
        "after": after,
        "eval_over_train_before": naive["eval_seconds"] / train_seconds,
        "eval_over_train_after": after["eval_seconds"] / train_seconds,
        "speedup_eval": naive["eval_seconds"] / after["eval_seconds"],
        "acc_before": acc_before,
        "acc_after": acc_after,
        "acc_match": abs(acc_before - acc_after) <= 1e-9,
        "max_loglikelihood_diff": max(diffs),
    }, indent=2))


def load_model_name() -> str:
    from qsweep.config.schema import load_sweep

    return load_sweep(SWEEP).model.name


if __name__ == "__main__":
    main()
