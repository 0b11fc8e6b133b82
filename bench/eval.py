"""qsweep's in-trial scoring vs. lm-eval's own CLI, side by side on the same adapter and items.

One quickstart trial is trained (qsweep.train.trial.run_trial), then scored on two sets of items:
  trial   what every quickstart trial is scored on (zorble, its seeded 20 items);
  final   what the final stage scores a finalist on (all 38 zorble items + the MMLU guard, 57 questions).
Each set is scored two ways, one after the other on one thread each (as a trial runs):
  qsweep  qsweep.evaluate.harness.score on the trained model already in memory, as run_trial scores it;
  cli     `lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER,... --tasks ... --samples ...`
          in a fresh process, on the very same model: transformers 5 refuses 4-bit settings in
          model_args (DESIGN.md), so BASE is the trial's own stored 4-bit base (train.quantized: a
          pre-quantized checkpoint that carries its quantization config), loaded with the same fp32
          unquantized layers, the same mixed precision (the compute dtype), batch size and items.
Prints JSON: questions per second each way (the CLI's whole command, which is what scoring an
adapter costs with it, and its scoring from its first request to its exit, writing its results
included), their ratio, and whether both gave the same accuracy and per-item log-likelihoods.

    python bench/eval.py                 # the quickstart's trial as written; a few minutes on 2 CPU cores
    python bench/eval.py --steps 10      # cut short
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import emit, machine

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "sweeps" / "quickstart.yaml"
# lm-eval's own log lines: "2026-12-06:03:13:50 INFO [...] message" (its default format).
CLI_LOG = re.compile(r"^(\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d)(?:,\d+)? .*Running loglikelihood requests")


def item_sets(evaluation: Any) -> dict[str, dict[str, Any]]:
    final = evaluation.final
    return {"trial": {"tasks": evaluation.tasks, "stage": None},
            "final": {"tasks": [*evaluation.tasks, *final.tasks], "stage": final}}


def train(steps: int | None, out_dir: Path) -> tuple[Any, Any, Any, Any, float]:
    """The quickstart's base trial, run as a sweep runs it; its scoring call keeps the model in memory."""
    import torch

    import qsweep.train.trial
    from qsweep.config.schema import load_sweep
    from qsweep.evaluate.harness import score

    torch.set_num_threads(1)
    sweep = load_sweep(SWEEP)
    trial = sweep.trial()
    if steps is not None:
        trial.training.max_steps, trial.training.eval_every = steps, min(trial.training.eval_every, steps)
    kept: dict[str, Any] = {}

    def keep(model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
        kept.update(model=model, tokenizer=tokenizer)
        return score(model, tokenizer, *args, **kwargs)

    qsweep.train.trial.score = keep  # the exact run_trial path, no copy of it
    outcome = qsweep.train.trial.run_trial(trial, sweep.base_dir, out_dir, report=lambda _: None)
    return sweep, trial, kept["model"], kept["tokenizer"], outcome.metrics["train_seconds"]


def qsweep_side(sweep: Any, trial: Any, model: Any, tokenizer: Any, items: dict[str, Any]) -> dict[str, Any]:
    from qsweep.evaluate.harness import auto_batch_size, score

    started = time.perf_counter()
    result = score(model, tokenizer, trial.evaluation, sweep.base_dir, trial.quantization, stage=items["stage"])
    seconds = time.perf_counter() - started
    questions = sum(len(v) for v in result.samples.values())
    return {"seconds": round(seconds, 2), "questions": questions, "questions_per_s": round(questions / seconds, 3),
            "batch_size": auto_batch_size(model), "dtype": result.dtype, "ids": result.items,
            "acc": {k: v for k, v in result.scores.items() if k.endswith("/acc") and k.count("_") < 2},
            "loglikelihoods": {(t, s["doc_id"]): s["loglikelihoods"] for t, v in result.samples.items() for s in v}}


def stored_base(trial: Any) -> Path:
    from qsweep.train import quantized
    from qsweep.train.models import resolve_model
    from qsweep.train.trial import bnb_config

    info = resolve_model(trial.model.name, trial.model.revision)
    folder = quantized.stored_folder(quantized.quantized_key(info.content_hash, bnb_config(trial.quantization)))
    if not (folder / "config.json").exists():
        sys.exit(f"no stored 4-bit base in {folder}: the CLI side needs the trial's own (run on a CPU)")
    return folder


def cli_side(trial: Any, adapter: Path, items: dict[str, Any], ids: dict[str, list[int]], batch_size: int,
             dtype: str, out: Path) -> dict[str, Any]:
    """lm-eval's CLI in a fresh process on one thread. It takes one --include_path, so the task folders
    qsweep reads (zorble, the generated offline MMLU) are copied under one; zorble's YAML names its
    data relative to itself, which the CLI resolves against the working directory: it runs from there."""
    import shutil

    from qsweep.evaluate.harness import include_dirs

    include = out / "tasks"
    for folder in include_dirs([], REPO):
        shutil.copytree(folder, include / folder.name, dirs_exist_ok=True)
    # The stored base holds no tokenizer; the trial saved its own beside the adapter.
    args = [f"pretrained={stored_base(trial)}", f"peft={adapter}", f"tokenizer={adapter}", "dtype=float32"]
    if dtype != "float32":
        args.append(f"mixed_precision_dtype={dtype}")
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args", ",".join(args),
               "--tasks", ",".join(items["tasks"]), "--include_path", str(include), "--samples", json.dumps(ids),
               "--batch_size", str(batch_size), "--device", "cpu", "--num_fewshot", "0",
               "--output_path", str(out / "results"), "--log_samples"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started, started_epoch = time.perf_counter(), time.time()
    done = subprocess.run(command, cwd=REPO / "evaluation" / "tasks" / "zorble", env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"lm_eval failed:\n{done.stderr[-4000:]}")
    requests = [datetime.strptime(m[1], "%Y-%m-%d:%H:%M:%S").timestamp() for line in done.stderr.splitlines()
                if (m := CLI_LOG.match(line))]
    scoring = started_epoch + wall - requests[0] if requests else None
    results = json.loads(next((out / "results").rglob("results_*.json")).read_text())["results"]
    lls = {}
    for path in (out / "results").rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            lls[(task, sample["doc_id"])] = [float(r[0]) for r in sample["filtered_resps"]]
    questions = len(lls)
    return {"wall_s": round(wall, 2), "scoring_s": round(scoring, 2) if scoring else None, "questions": questions,
            "questions_per_s_whole_command": round(questions / wall, 3),
            "questions_per_s_scoring": round(questions / scoring, 3) if scoring else None,
            "acc": {f"{t}/acc": v["acc,none"] for t, v in results.items() if "acc,none" in v and t.count("_") < 2},
            "loglikelihoods": lls}


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    lls_ours, lls_theirs = ours.pop("loglikelihoods"), theirs.pop("loglikelihoods")
    ours.pop("ids")
    diffs = [abs(a - b) for key, row in lls_ours.items() for a, b in zip(row, lls_theirs.get(key, []))]
    return {
        "qsweep": ours, "lm_eval_cli": theirs,
        "same_items": set(lls_ours) == set(lls_theirs),
        "same_acc": all(abs(v - theirs["acc"].get(k, -1)) < 1e-9 for k, v in ours["acc"].items()),
        "max_loglikelihood_diff": max(diffs) if diffs else None,
        "ratio_qsweep_over_cli_whole_command": round(ours["questions_per_s"] / theirs["questions_per_s_whole_command"], 2),
        "ratio_qsweep_over_cli_scoring": (round(ours["questions_per_s"] / theirs["questions_per_s_scoring"], 2)
                                          if theirs["questions_per_s_scoring"] else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the sweep's)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qsweep-bench-eval-") as tmp:
        # The Trainer prints its logs to stdout; they go to stderr so that stdout is the JSON alone.
        with contextlib.redirect_stdout(sys.stderr):
            sweep, trial, model, tokenizer, train_seconds = train(args.steps, Path(tmp) / "trial")
            compared = {}
            for name, items in item_sets(trial.evaluation).items():
                ours = qsweep_side(sweep, trial, model, tokenizer, items)
                theirs = cli_side(trial, Path(tmp) / "trial" / "adapter", items, ours["ids"], ours["batch_size"],
                                  ours["dtype"], Path(tmp) / f"cli-{name}")
                compared[name] = compare(ours, theirs)
    emit({"machine": machine(), "threads": 1, "model": trial.model.name, "steps": trial.training.max_steps,
          "train_seconds": round(train_seconds, 2), **compared}, args.out)


if __name__ == "__main__":
    main()
