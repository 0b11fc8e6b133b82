"""One trial at a time vs. packed by qsweep: the same sweep twice, side by side, in one run.

Prints JSON: trials finished per hour, memory used over time (mean and peak, as a share of the
device), tokens/s summed over trials, OOM count, each trial's estimate vs measured peak, and the
packed/serial ratios. On a GPU (`--device cuda`) it compares one trial per GPU with qsweep's
memory-sized shares; on a CPU it runs the same code path with CPU slots (one trial with every core
vs. one core per trial, memory-sized).

    python bench/packing.py                       # tiny random Llama, 8 trials (CPU: ~3 min)
    python bench/packing.py --model smollm2-135m --trials 8 --steps 40
    python bench/packing.py --device cuda --model llama-1b --trials 32 --batch-size 16 --seq 256
    python bench/packing.py --device cuda --model llama-1b --packer processes   # without Ray

`llama-1b` / `llama-8b` are qsweep's embedded random-llama-1b / -8b: the published Llama-3.2-1B and
Llama-3.1-8B shapes with random weights, built on first use (no hub). `--packer processes` packs
plain processes instead of Ray trials, each capped like a Ray trial at its share less the CUDA
context, started first-fit as shares free up: it measures packing itself (trials per hour of
training + lm-eval scoring, memory share, OOMs, estimates) without Ray's start-up, the baseline
scoring, Optuna or MLflow, so its trials per hour are higher than `qsweep run`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from benchlib import emit

REPO = Path(__file__).resolve().parent.parent
ZORBLE = REPO / "evaluation" / "tasks" / "zorble"
MODELS = {"llama-1b": "random-llama-1b", "llama-8b": "random-llama-8b"}
# The goals for the 1B shape on one GPU.
GOALS = {"ratio_trials_per_hour": 3.0, "memory_peak_share": 0.85, "estimate_error": 0.10}


def sweep_file(folder: Path, name: str, model: str, trials: int, steps: int, packed: bool, gpu: bool,
               batch_size: int = 8, seq: int = 64, full: bool = False) -> Path:
    cores = os.cpu_count() or 1
    resources = ({"cpus_per_trial": 1, "gpus_per_trial": "auto"} if packed else {"cpus_per_trial": 1, "gpus_per_trial": 1})
    if not gpu:
        resources = {"cpus_per_trial": 1} if packed else {"cpus_per_trial": cores}
    ranks = [4, 8, 16, 32, 64, 8, 16, 32]
    train, validation = ((full_rows(folder, seq, "train"), full_rows(folder, seq, "validation")) if full
                         else (ZORBLE / "train.jsonl", ZORBLE / "validation.jsonl"))
    sweep = {
        "name": name,
        "model": {"name": model},
        "data": {"train": str(train), "validation": str(validation),
                 "prompt": "Q: {question}\nA:", "completion": " {answer}" + ("\n{filler}" if full else ""),
                 "max_seq_length": seq},
        "training": {"max_steps": steps, "batch_size": batch_size, "learning_rate": 1.0e-3,
                     "eval_every": max(1, steps // 2)},
        "search": {"space": str(REPO / "search_spaces" / "qlora.yaml"), "num_trials": trials,
                   "asha": {"enabled": False}, "metric": "zorble/acc",
                   "baselines": [{"lora.r": ranks[i % len(ranks)], "quantization.quant_type": "nf4",
                                  "lora.target_modules": "all-linear", "training.learning_rate": 1.0e-3}
                                 for i in range(trials)]},
        "evaluation": {"tasks": ["zorble"], "limit": 20},
        "tracking": {"uri": f"sqlite:///{folder}/mlflow.db"},
        "resources": resources,
        "output_dir": str(folder / "runs"),
    }
    if not packed:
        sweep["search"]["max_concurrent"] = 1
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def full_rows(folder: Path, seq: int, split: str) -> Path:
    """zorble's rows, each followed by enough text to fill max_seq_length once tokenized: the
    estimate sizes a trial for full rows, and so does a real fine-tuning set of long documents."""
    filler = "The quick brown fox jumps over the lazy dog. 0123456789 " * max(1, seq // 4)
    rows = [json.loads(line) for line in (ZORBLE / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    path = folder / f"{split}_full.jsonl"
    path.write_text("".join(json.dumps({**row, "filler": filler}) + "\n" for row in rows))
    return path


class MemorySampler(threading.Thread):
    """Samples device memory in use every 0.5 s (GPU: torch.cuda.mem_get_info; CPU: MemAvailable)."""

    def __init__(self, gpu: bool):
        super().__init__(daemon=True)
        self.gpu, self.samples, self.stop = gpu, [], threading.Event()

    def used_and_total(self) -> tuple[float, float]:
        if self.gpu:
            import torch

            free, total = torch.cuda.mem_get_info()
            return total - free, total
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(info["MemTotal"].split()[0]) * 1024
        return total - int(info["MemAvailable"].split()[0]) * 1024, total

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.used_and_total())
            time.sleep(0.5)


def run_one(path: Path, gpu: bool) -> dict:
    from mlflow.tracking import MlflowClient

    sampler = MemorySampler(gpu)
    idle_used, total = sampler.used_and_total()
    sampler.start()
    started = time.perf_counter()
    # Through this interpreter, not the console script: on a GPU machine qsweep may only be on PYTHONPATH.
    qsweep = [sys.executable, "-c", "from qsweep.cli import app; app()"]
    proc = subprocess.run([*qsweep, "run", str(path)], cwd=path.parent,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    used = [u - idle_used for u, _ in sampler.samples]
    client = MlflowClient(tracking_uri=f"sqlite:///{path.parent}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`qsweep.kind` = 'trial'")
    finished = [r for r in runs if r.data.tags.get("qsweep.outcome") == "finished"]
    return {
        "exit_code": proc.returncode,
        "wall_seconds": wall,
        "trials_finished": len(finished),
        "trials_per_hour": len(finished) / wall * 3600,
        "oom": sum(1 for r in runs if r.data.tags.get("qsweep.outcome") == "oom"),
        "tokens_per_second_summed": sum(r.data.metrics.get("tokens_per_second", 0) for r in finished),
        "memory_mean_share": sum(used) / len(used) / total if used else 0.0,
        "memory_peak_share": max(used) / total if used else 0.0,
        "per_trial": [per_trial(r.data.metrics) for r in finished],
    }


def per_trial(metrics: dict) -> dict:
    estimate, peak = metrics.get("memory_estimate_mb", 0.0), metrics.get("peak_memory_mb", 0.0)
    return {"estimate_mb": estimate, "peak_mb": peak, "peak_over_estimate": peak / estimate if estimate else None}


def run_processes(path: Path, packed: bool, gpu: bool) -> dict:
    """The sweep's trials as plain processes, packed first-fit by their requests (no Ray): each is
    capped at its share less the CUDA context, like a Ray trial."""
    from qsweep.config.schema import load_sweep
    from qsweep.resources.packing import resources_for, this_machine
    from qsweep.search.space import apply_params
    from qsweep.train.models import resolve_model

    sweep = load_sweep(path)
    machine = this_machine()
    request = resources_for(sweep, resolve_model(sweep.model.name).path, machine)
    cores = os.cpu_count() or 1
    pending = []
    for index, params in enumerate(sweep.search.baselines):
        ask = request(params) if packed else ({"cpu": cores, "gpu": 1.0} if gpu else {"cpu": cores})
        share = ask.get("gpu", ask.get("memory", 0) / 2**20 / machine.memory_mb)
        pending.append((index, apply_params(sweep.trial(), params), share, ask["cpu"]))
    sampler = MemorySampler(gpu)
    idle_used, total = sampler.used_and_total()
    sampler.start()
    started = time.perf_counter()
    running: list[tuple[subprocess.Popen, float, float, Path]] = []
    outcomes = []
    while pending or running:
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            outcomes.append(json.loads(item[3].read_text()) if item[3].exists() else {"failed": "no outcome"})
        while pending and (not running or (sum(r[1] for r in running) + pending[0][2] <= 1.0 + 1e-9
                                           and sum(r[2] for r in running) + pending[0][3] <= cores)):
            index, trial, share, cpus = pending.pop(0)
            out = path.parent / "trials" / str(index)
            out.mkdir(parents=True, exist_ok=True)
            spec = {"trial": trial.model_dump(mode="json"), "base_dir": str(sweep.base_dir), "out_dir": str(out),
                    "share": share if gpu else None, "threads": int(cpus)}
            (out / "spec.json").write_text(json.dumps(spec))
            child = subprocess.Popen([sys.executable, __file__, "--child", str(out / "spec.json")],
                                     stdout=subprocess.DEVNULL, stderr=open(out / "stderr.log", "w"))
            running.append((child, share, cpus, out / "outcome.json"))
        time.sleep(0.5)
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    used = [u - idle_used for u, _ in sampler.samples]
    finished = [o for o in outcomes if "failed" not in o]
    return {
        "wall_seconds": wall,
        "trials_finished": len(finished),
        "trials_per_hour": len(finished) / wall * 3600,
        "oom": sum(1 for o in outcomes if o.get("oom")),
        "failed": [o["failed"][-300:] for o in outcomes if "failed" in o],
        "tokens_per_second_summed": sum(o["tokens_per_second"] for o in finished),
        "memory_mean_share": sum(used) / len(used) / total if used else 0.0,
        "memory_peak_share": max(used) / total if used else 0.0,
        "per_trial": [per_trial(o) for o in finished],
    }


def child(spec_file: Path) -> None:
    """One trial in this process, capped at its share less the context (what a Ray trial gets)."""
    spec = json.loads(spec_file.read_text())
    import torch

    from qsweep.config.schema import TrialConfig
    from qsweep.resources.caps import tensor_fraction
    from qsweep.train.trial import run_trial

    torch.set_num_threads(max(1, spec["threads"]))
    if spec["share"] is not None and torch.cuda.is_available():
        card_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        torch.cuda.set_per_process_memory_fraction(tensor_fraction(spec["share"], card_mb))
    out = Path(spec["out_dir"])
    try:
        outcome = run_trial(TrialConfig(**spec["trial"]), Path(spec["base_dir"]), out, report=lambda _: None)
        result = outcome.metrics
    except Exception as exc:  # noqa: BLE001 - a trial's failure is its result, as in a sweep
        text = f"{type(exc).__name__}: {exc}"
        result = {"failed": text, "oom": "out of memory" in text.lower() or "allocate memory" in text.lower()}
    (out / "outcome.json").write_text(json.dumps(result))


def goals(serial: dict, packed: dict) -> dict:
    errors = [abs(t["peak_over_estimate"] - 1) for t in packed["per_trial"] if t["peak_over_estimate"]]
    return {
        "ratio_trials_per_hour_at_least_3": packed["trials_per_hour"] / max(serial["trials_per_hour"], 1e-9)
        >= GOALS["ratio_trials_per_hour"],
        "memory_peak_share_at_least_0.85": packed["memory_peak_share"] >= GOALS["memory_peak_share"],
        "no_oom": packed["oom"] == 0 and serial["oom"] == 0,
        "every_estimate_within_10pct": bool(errors) and max(errors) <= GOALS["estimate_error"],
        "worst_estimate_error": max(errors) if errors else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a qsweep model, or llama-1b / llama-8b")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64, help="max_seq_length")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--packer", choices=["ray", "processes"], default="ray",
                        help="qsweep run (Ray), or plain capped processes packed first-fit")
    parser.add_argument("--full-rows", action=argparse.BooleanOptionalAction, default=None,
                        help="fill every row to --seq (default: on for cuda, off for cpu)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    gpu = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not gpu:
        sys.stderr.write("--device cuda: torch sees no CUDA device here\n")
        sys.exit(2)
    model = MODELS.get(args.model, args.model)
    full = gpu if args.full_rows is None else args.full_rows
    device = torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(prefix="qsweep-bench-") as tmp:
        results = {}
        for name, packed in (("serial", False), ("packed", True)):
            folder = Path(tmp) / name
            folder.mkdir()
            path = sweep_file(folder, name, model, args.trials, args.steps, packed, gpu, args.batch_size, args.seq,
                              full)
            results[name] = run_one(path, gpu) if args.packer == "ray" else run_processes(path, packed, gpu)
    serial, packed = results["serial"], results["packed"]
    report = {
        "device": device, "model": model, "packer": args.packer, "trials": args.trials, "steps": args.steps,
        "batch_size": args.batch_size, "seq": args.seq, "full_rows": full,
        "serial": serial, "packed": packed,
        "ratio_trials_per_hour": packed["trials_per_hour"] / max(serial["trials_per_hour"], 1e-9),
        "ratio_tokens_per_second": packed["tokens_per_second_summed"] / max(serial["tokens_per_second_summed"], 1e-9),
        "goals": goals(serial, packed) if gpu else None,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
