"""qsweep vs. the hand-wired anchor: the same N trials x S steps, side by side, in one run.

The anchor is what a user writes without qsweep: transformers `Trainer.hyperparameter_search`
(optuna backend) over a `model_init` that loads the 4-bit base (bitsandbytes, quantized like
qsweep) and attaches LoRA (peft), trials one after another with every core. Both sides score with
the quickstart's own evaluation (sweeps/quickstart.yaml: zorble on its seeded 20 items for every
trial and for the untuned base of each 4-bit type, then the top_k re-scored on all items plus the
MMLU guard, and the guard on the untuned base), through the same lm-eval call
(qsweep.evaluate.harness.evaluate_model, in the dtype config.policy.scoring_dtype picks), so only
the orchestration differs. The anchor's final stage is written as a user would: each finalist and
each base loaded (and quantized) afresh. qsweep is the real CLI (`qsweep run`): Ray Tune, Optuna,
lm-eval and MLflow. Both run in fresh processes with a fresh output folder and tracking store, on
the same model, data, trial configs, steps and batch.

Prints JSON: both walls, their ratio (qsweep / anchor), the anchor's training, scoring and final
stage seconds, and qsweep's time per phase, taken from the timestamps of its own log and the
timings each trial logs to MLflow.

    python bench/anchor.py                        # smollm2-135m, 4 trials x 20 steps, batch 8
    python bench/anchor.py --quick                # tiny random Llama, 2 x 4: a smoke test
    python bench/anchor.py --trials 4 --steps 20 --batch 8 --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml
from benchlib import machine

REPO = Path(__file__).resolve().parent.parent
ZORBLE = REPO / "evaluation" / "tasks" / "zorble"
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"
PROMPT, COMPLETION, MAX_LENGTH = "Q: {question}\nA:", " {answer}", 64
# One config per trial, the same for both sides; both 4-bit types, as in the quickstart.
CONFIGS = [
    {"quantization.quant_type": "nf4", "lora.r": 16, "training.learning_rate": 1.0e-3},
    {"quantization.quant_type": "fp4", "lora.r": 16, "training.learning_rate": 1.0e-3},
    {"quantization.quant_type": "nf4", "lora.r": 8, "training.learning_rate": 2.0e-3},
    {"quantization.quant_type": "fp4", "lora.r": 32, "training.learning_rate": 5.0e-4},
]
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ (\S+): (.*)$")


def configs(n: int) -> list[dict]:
    return [CONFIGS[i % len(CONFIGS)] for i in range(n)]


def quickstart_evaluation() -> dict:
    """The quickstart's own evaluation (tasks, items, final stage with its MMLU guard), for both sides."""
    return yaml.safe_load(QUICKSTART.read_text())["evaluation"]


def anchor_main(model: str, trials: int, steps: int, batch: int) -> None:
    """The hand-wired anchor, run in its own process (`--anchor`): Trainer.hyperparameter_search, each
    trial scored with lm-eval on the quickstart's items (the same `evaluate_model` call qsweep makes,
    so both sides score the same tasks the same way), the untuned base scored once per 4-bit type
    before its first trial, then the quickstart's final stage written by hand: the top_k re-scored on
    the final items and guard, each on a freshly loaded base, and the untuned base on the guard."""
    import optuna
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from qsweep.config.policy import fastest_compute_dtype, scoring_dtype
    from qsweep.config.schema import EvaluationConfig
    from qsweep.evaluate.harness import evaluate_model, include_dirs
    from qsweep.train.data import load_rows, tokenize_rows
    from qsweep.train.models import resolve_model

    path = resolve_model(model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encode = lambda name: tokenize_rows(load_rows(str(ZORBLE / name), REPO), tokenizer,  # noqa: E731
                                        PROMPT, COMPLETION, MAX_LENGTH)
    train_set, eval_set = encode("train.jsonl"), encode("validation.jsonl")
    plan = configs(trials)
    # The fastest compute dtype the machine runs natively, as a user tuning by hand would pick it
    # (bf16 on a CPU with AMX-BF16 or on CUDA): the same rule as qsweep's `auto`, so both sides match.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, fastest_compute_dtype(device)[0])
    evaluation = EvaluationConfig(**quickstart_evaluation())
    final, dirs, metric = evaluation.final, include_dirs([], REPO), f"{evaluation.tasks[0]}/acc"
    spent = {"training_s": 0.0, "scoring_s": 0.0, "final_stage_s": 0.0}

    def scores(model, tasks: list[str], limit: int | None, per_subject: int | None) -> dict[str, float]:
        started = time.perf_counter()
        model.eval()
        found = evaluate_model(model, tokenizer, tasks, dirs, limit=limit, per_subject=per_subject,
                               subset_seed=evaluation.subset_seed, dtype=scoring_dtype("auto", device)).scores
        spent["scoring_s"] += time.perf_counter() - started
        return found

    def base(quant_type: str):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype)
        return prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=False)

    def pick(trial) -> dict:
        # transformers calls model_init before hp_space; optuna returns the same value to both.
        return plan[trial.suggest_categorical("config", list(range(len(plan))))] if trial is not None else plan[0]

    untuned: dict[str, dict[str, float]] = {}
    done: list[dict] = []

    def model_init(trial):
        config = pick(trial)
        quant_type = config["quantization.quant_type"]
        loaded = base(quant_type)
        if trial is not None and quant_type not in untuned:
            untuned[quant_type] = scores(loaded, evaluation.tasks, evaluation.limit, evaluation.per_subject)
        lora = LoraConfig(r=config["lora.r"], lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        if trial is not None:
            done.append({"config": config})
        return get_peft_model(loaded, lora)

    def hp_space(trial):
        return {"learning_rate": pick(trial)["training.learning_rate"]}

    with tempfile.TemporaryDirectory(prefix="anchor-") as out:
        def objective(metrics: dict) -> float:
            # The trained adapter scored like a qsweep trial, and kept for the final stage.
            trained = trainer.model
            done[-1]["scores"] = scores(trained, evaluation.tasks, evaluation.limit, evaluation.per_subject)
            done[-1]["adapter"] = Path(out) / f"trial{len(done)}"
            trained.save_pretrained(done[-1]["adapter"])
            return done[-1]["scores"][metric]

        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                                 per_device_eval_batch_size=batch, eval_strategy="no", save_strategy="no",
                                 report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                                 logging_steps=10, seed=0)
        trainer = Trainer(model_init=model_init, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        started = time.perf_counter()
        best = trainer.hyperparameter_search(
            hp_space=hp_space, backend="optuna", n_trials=trials, direction="maximize", compute_objective=objective,
            sampler=optuna.samplers.GridSampler({"config": list(range(len(plan)))}, seed=0),
        )
        search_s = time.perf_counter() - started
        # Training is the search less its scoring; the final stage's scoring is counted in its own phase.
        spent["training_s"] = search_s - spent["scoring_s"]
        started = time.perf_counter()
        top = sorted(done, key=lambda d: d["scores"][metric], reverse=True)[:final.top_k]
        final_tasks = [*evaluation.tasks, *final.tasks]
        for finalist in top:
            model = PeftModel.from_pretrained(base(finalist["config"]["quantization.quant_type"]), finalist["adapter"])
            finalist["final"] = scores(model, final_tasks, final.limit, final.per_subject)
        guard = {q: scores(base(q), final.tasks, final.limit, final.per_subject)
                 for q in sorted({f["config"]["quantization.quant_type"] for f in top})}
        spent["final_stage_s"] = time.perf_counter() - started
    print(json.dumps({"best_score": best.objective, "compute_dtype": str(dtype),
                      "final": [{k: f["final"].get(k) for k in (metric, f"{final.tasks[0]}/acc")} for f in top],
                      "untuned_guard": {q: g.get(f"{final.tasks[0]}/acc") for q, g in guard.items()},
                      **{k: round(v, 2) for k, v in spent.items()}}))


def sweep_file(folder: Path, model: str, trials: int, steps: int, batch: int) -> Path:
    pinned = [{**c, "quantization.double_quant": True, "lora.alpha": 32, "lora.dropout": 0.05,
               "lora.target_modules": "all-linear"} for c in configs(trials)]
    sweep = {
        "name": "anchor-bench",
        "model": {"name": model},
        "data": {"train": str(ZORBLE / "train.jsonl"), "validation": str(ZORBLE / "validation.jsonl"),
                 "prompt": PROMPT, "completion": COMPLETION, "max_seq_length": MAX_LENGTH},
        "quantization": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "training": {"max_steps": steps, "batch_size": batch, "eval_every": steps},
        "search": {"space": str(REPO / "search_spaces" / "qlora.yaml"), "num_trials": trials, "metric": "zorble/acc",
                   "asha": {"enabled": False}, "baselines": pinned},
        "evaluation": quickstart_evaluation(),
        "tracking": {"uri": f"sqlite:///{folder}/mlflow.db"},
        "resources": {"cpus_per_trial": 1},
        "output_dir": str(folder / "runs"),
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


# Runs the real CLI with timestamped log lines (the CLI's own basicConfig is then a no-op).
QSWEEP_CLI = (
    "import logging, sys; "
    "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
    "from qsweep.cli import app; sys.argv = ['qsweep', '-v', 'run', sys.argv[1]]; app()"
)


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess, float]:
    started_epoch = time.time()
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, proc, started_epoch


def log_events(stderr: str) -> list[tuple[float, str, str]]:
    events = []
    for line in stderr.splitlines():
        match = LOG_LINE.match(line)
        if match:
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((stamp, match[2], match[3]))
    return events


def first_time(events: list, pattern: str) -> float | None:
    return next((t for t, _, message in events if re.search(pattern, message)), None)


def seconds_in(events: list, pattern: str) -> list[float]:
    return [float(m[1]) for _, _, message in events if (m := re.search(pattern, message))]


def qsweep_profile(folder: Path, stderr: str, started: float, wall: float) -> dict:
    """Where qsweep's wall went, from its log timestamps and the timings its trials logged."""
    from mlflow.tracking import MlflowClient

    events = log_events(stderr)
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    trials = client.search_runs(experiments, filter_string="tags.`qsweep.kind` = 'trial'")
    parent = client.search_runs(experiments, filter_string="tags.`qsweep.kind` = 'sweep'")[0]
    per_trial = []
    for run in sorted(trials, key=lambda r: r.info.start_time):
        m = run.data.metrics
        in_worker = {k: round(m.get(f"{k}_seconds", 0.0), 2) for k in ("setup", "load", "train", "eval", "wall")}
        driver_span = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        per_trial.append({
            "trial": run.data.tags.get("qsweep.trial_id"),
            "outcome": run.data.tags.get("qsweep.outcome"),
            "compute_dtype": run.data.params.get("provenance.compute_dtype"),
            "worker_process_start_and_imports_s": in_worker["setup"],
            "model_load_and_quantize_s": in_worker["load"],
            "training_s": in_worker["train"],
            "lm_eval_s": in_worker["eval"],
            "untuned_base_scored_in_trial_s": round(m.get("baseline_seconds", 0.0), 2),
            "trial_wall_in_worker_s": in_worker["wall"],
            "driver_span_s": round(driver_span, 2),
            "zorble/acc": m.get("zorble/acc"),
        })
    ray_started = first_time(events, r"^ray started")
    fit_started = first_time(events, r"^trial \S+ started")
    sweep_done = [t for t, _, msg in events if msg.startswith("sweep ") and " done" in msg]
    base = parent.data.metrics
    profile = {
        "process_start_to_ray_init_s": round((ray_started or started) - started, 2) if ray_started else None,
        "ray_start_s": (seconds_in(events, r"^ray started in ([\d.]+) s") or [None])[0],
        "baseline_scoring_s": {k.removeprefix("baseline_seconds/"): round(v, 2) for k, v in base.items()
                               if k.startswith("baseline_seconds/")},
        "baselines_from_cache": {k.removeprefix("qsweep.baseline_cache."): v for k, v in parent.data.tags.items()
                                 if k.startswith("qsweep.baseline_cache.")},
        "first_trial_started_after_s": round(fit_started - started, 2) if fit_started else None,
        "mlflow_logging_per_trial_s": seconds_in(events, r"logged to MLflow in ([\d.]+) s"),
        "sweep_phases_s": {m[1]: float(m[2]) for _, _, msg in events
                                  if (m := re.search(r"^phase (\S+) took ([\d.]+) s", msg))},
        "ended_after_sweep_done_s": round(started + wall - sweep_done[-1], 2) if sweep_done else None,
        "trials": per_trial,
    }
    busy = sum(t["trial_wall_in_worker_s"] for t in per_trial)
    profile["sum_of_trial_walls_in_workers_s"] = round(busy, 2)
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 2 trials x 4 steps, batch 4")
    parser.add_argument("--warm", action="store_true",
                        help="run qsweep a second time, its untuned-base scores then in the evaluation cache")
    parser.add_argument("--log", type=Path, help="also write qsweep's timestamped log here")
    parser.add_argument("--anchor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.trials, args.steps, args.batch = "tiny-llama", 2, 4, 4
    if args.anchor:
        anchor_main(args.model, args.trials, args.steps, args.batch)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    # Built once before either side is timed, so neither pays for it.
    subprocess.run([sys.executable, "-c", f"from qsweep.train.models import resolve_model; resolve_model({args.model!r})"],
                   env=env, check=True)
    with tempfile.TemporaryDirectory(prefix="qsweep-anchor-") as tmp:
        folder = Path(tmp)
        anchor_wall, anchor, _ = timed([sys.executable, __file__, "--anchor", "--model", args.model, "--trials",
                                        str(args.trials), "--steps", str(args.steps), "--batch", str(args.batch)],
                                       folder, env)
        if anchor.returncode != 0:
            sys.exit(f"anchor failed:\n{anchor.stderr[-4000:]}")
        env["QSWEEP_CACHE"] = str(fresh_cache(folder / "cache"))
        runs = {"cold_cache": run_qsweep(folder / "cold", args, env)}
        if args.warm:
            runs["warm_cache"] = run_qsweep(folder / "warm", args, env)
    print(json.dumps({
        "machine": machine(), "model": args.model, "trials": args.trials, "steps": args.steps, "batch": args.batch,
        "anchor": {"wall_s": round(anchor_wall, 2), **json.loads(anchor.stdout.strip().splitlines()[-1])},
        **{f"qsweep_{name}": run for name, run in runs.items()},
        **{f"ratio_qsweep_{name}_over_anchor": round(run["wall_s"] / anchor_wall, 3) for name, run in runs.items()},
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
    }, indent=2))


def fresh_cache(folder: Path) -> Path:
    """An empty evaluation cache that still sees the built models (and their hashes), so the first
    qsweep run scores its untuned base like a first sweep on a machine does."""
    from qsweep.train.models import cache_dir

    folder.mkdir(parents=True)
    for name in ("models", "hashes"):
        if (cache_dir() / name).exists():
            (folder / name).symlink_to(cache_dir() / name)
    return folder


def run_qsweep(folder: Path, args: argparse.Namespace, env: dict) -> dict:
    folder.mkdir()
    path = sweep_file(folder, args.model, args.trials, args.steps, args.batch)
    wall, run, started = timed([sys.executable, "-c", QSWEEP_CLI, str(path)], folder, env)
    if args.log:
        args.log.with_name(f"{args.log.stem}.{folder.name}{args.log.suffix}").write_text(run.stderr)
    if run.returncode != 0:
        sys.exit(f"qsweep run failed:\n{run.stderr[-4000:]}")
    return {"wall_s": round(wall, 2), "profile": qsweep_profile(folder, run.stderr, started, wall)}


if __name__ == "__main__":
    main()
