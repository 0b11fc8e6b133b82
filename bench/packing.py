"""One trial at a time vs packed by memory: the same sweep run twice by `qsweep run`, side by side.

Prints JSON: trials finished per hour, card memory used over time (mean and peak, as a share of the
card), OOMs, each trial's estimate against its measured peaks (reserved and allocated) and its
process footprint, the GPU memory the sweep's driver itself held, and the packed/serial ratios. On
a GPU with `--mps` the packed sweep runs a third time under NVIDIA MPS (the daemon is started for
it and stopped after; skipped, with the reason, when it cannot start). On a CPU the same code runs
with CPU slots: one trial with every core vs one core per trial, memory-sized.

    python bench/packing.py                                  # tiny random Llama, 8 trials (CPU)
    python bench/packing.py --device cuda --model llama-1b --trials 6 --steps 10 --mps

`llama-1b` / `llama-8b` are qsweep's embedded random-llama-1b / -8b (the published Llama-3.2-1B
and Llama-3.1-8B shapes with random weights, no hub). This process never touches CUDA: the model is
built by a child process, each sweep is a child `qsweep run`, and the card is sampled through NVML,
which holds no GPU memory (a process that sampled with torch would hold a CUDA context on the card
it measures). scripts/gpu_proof.sh runs this as the packing part of the GPU proof.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import emit
from card import Card, MemorySampler, mps_processes, open_card, run_child, settle, start_mps, stop_mps

REPO = Path(__file__).resolve().parent.parent
ZORBLE = REPO / "evaluation" / "tasks" / "zorble"
MODELS = {"llama-1b": "random-llama-1b", "llama-8b": "random-llama-8b"}
# The goals for the 1B shape on one GPU.
GOALS = {"ratio_trials_per_hour": 3.0, "memory_peak_share": 0.85, "estimate_error": 0.10}
# What each trial's MLflow run may hold about its memory (some only once the GPU path logs them).
MEMORY_METRICS = ("memory_estimate_mb", "peak_memory_mb", "peak_allocated_mb", "peak_reserved_mb",
                  "process_footprint_mb", "memory_ratio")
ABSENT = "absent"
QSWEEP = [sys.executable, "-c", "from qsweep.cli import app; app()"]  # qsweep may be on PYTHONPATH only


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
    """zorble's rows, each followed by enough text to fill max_seq_length once tokenized: a trial's
    batches then really are as long as a fine-tuning set of long documents makes them."""
    filler = "The quick brown fox jumps over the lazy dog. 0123456789 " * max(1, seq // 4)
    rows = [json.loads(line) for line in (ZORBLE / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    path = folder / f"{split}_full.jsonl"
    path.write_text("".join(json.dumps({**row, "filler": filler}) + "\n" for row in rows))
    return path


def build_model(model: str, timeout_s: float) -> dict[str, Any]:
    """The embedded model built once into qsweep's cache by a child process, before anything is timed."""
    done = run_child([sys.executable, "-c", "import sys; from qsweep.train.models import resolve_model; "
                      "print(resolve_model(sys.argv[1]).path)", model], timeout_s)
    return {"model": model, "seconds": round(done["seconds"], 1), "ok": done["exit_code"] == 0,
            **({} if done["exit_code"] == 0 else {"output_tail": done["output"][-2000:]})}


def run_sweep(path: Path, card: Card | None, timeout_s: float, ignore: frozenset[int] = frozenset()) -> dict[str, Any]:
    """`qsweep run` on the sweep in a child process while memory is sampled; its MLflow runs read back."""
    from mlflow.tracking import MlflowClient

    sampler = MemorySampler(card)
    idle_used, total = sampler.used_and_total()
    sampler.start()
    done = run_child([*QSWEEP, "run", str(path)], timeout_s, cwd=path.parent)
    sampler.stop.set()
    sampler.join()
    killed = settle(card, set(ignore))
    used = [u - idle_used for u in sampler.used]
    client = MlflowClient(tracking_uri=f"sqlite:///{path.parent}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`qsweep.kind` = 'trial'") if experiments else []
    parents = client.search_runs(experiments, filter_string="tags.`qsweep.kind` = 'sweep'") if experiments else []
    outcomes = [r.data.tags.get("qsweep.outcome", "none") for r in runs]
    finished = [r for r in runs if r.data.tags.get("qsweep.outcome") == "finished"]
    wall = done["seconds"]
    processes = sampler.process_peaks
    return {
        "exit_code": done["exit_code"],
        "timed_out": done["timed_out"],
        "wall_seconds": round(wall, 1),
        "trials": len(runs),
        "trials_finished": len(finished),
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "trials_per_hour": len(finished) / wall * 3600 if wall else 0.0,
        "oom": outcomes.count("oom"),
        "tokens_per_second_summed": sum(r.data.metrics.get("tokens_per_second", 0.0) for r in finished),
        "memory_mean_share": sum(used) / len(used) / total if used else 0.0,
        "memory_peak_share": max(used) / total if used else 0.0,
        "memory_total_mb": total / 2**20,
        "gpu_processes_at_once": sampler.most_processes if card else None,
        "gpu_process_peaks_mb": sorted((mb for mb in processes.values() if mb is not None), reverse=True)
        if card else None,
        # Issue 19, item 5: the sweep's driver holds no GPU memory (it never appears on the card).
        "driver_on_card": done["pid"] in processes if card else None,
        "driver_gpu_mb": processes.get(done["pid"]) if card else None,
        "killed_after": killed,
        "mps_logged": {key: value for r in parents for key, value in {**r.data.params, **r.data.tags}.items()
                       if "mps" in key.lower()},
        "per_trial": [per_trial(r.data.metrics) for r in finished],
        "failures": [r.data.tags.get("qsweep.reason", "")[:300] for r in runs
                     if r.data.tags.get("qsweep.outcome") not in ("finished", "stopped")],
        **({} if done["exit_code"] == 0 else {"output_tail": done["output"][-3000:]}),
    }


def per_trial(metrics: dict[str, float]) -> dict[str, Any]:
    """A trial's memory figures as logged, "absent" where it logged none, and each peak over the estimate."""
    row: dict[str, Any] = {name: metrics.get(name, ABSENT) for name in MEMORY_METRICS}
    estimate = metrics.get("memory_estimate_mb")
    for peak in ("peak_memory_mb", "peak_reserved_mb", "peak_allocated_mb"):
        value = metrics.get(peak)
        ratio = value / estimate if value is not None and estimate else ABSENT
        row[f"{peak.removesuffix('_mb')}_over_estimate"] = ratio
    return row


def goals(serial: dict, packed: dict) -> dict[str, Any]:
    errors = [abs(t["peak_memory_over_estimate"] - 1) for t in packed["per_trial"]
              if isinstance(t["peak_memory_over_estimate"], float)]
    return {
        "ratio_trials_per_hour_at_least_3": packed["trials_per_hour"] / max(serial["trials_per_hour"], 1e-9)
        >= GOALS["ratio_trials_per_hour"],
        "memory_peak_share_at_least_0.85": packed["memory_peak_share"] >= GOALS["memory_peak_share"],
        "no_oom": packed["oom"] == 0 and serial["oom"] == 0,
        "every_estimate_within_10pct": bool(errors) and max(errors) <= GOALS["estimate_error"],
        "worst_estimate_error": max(errors) if errors else None,
    }


def ratios(serial: dict, run: dict) -> dict[str, float]:
    return {"ratio_trials_per_hour": run["trials_per_hour"] / max(serial["trials_per_hour"], 1e-9),
            "ratio_tokens_per_second": run["tokens_per_second_summed"] / max(serial["tokens_per_second_summed"], 1e-9)}


def compare(model: str, trials: int, steps: int, batch_size: int, seq: int, gpu: bool, full: bool, mps: bool,
            timeout_s: float = 1800.0) -> dict[str, Any]:
    """Serial, packed and (when asked, on a GPU) packed under MPS, one after the other; `timeout_s`
    is shared: serial may use half of it (one at a time is the slow side), the rest is split evenly."""
    card = open_card(gpu)
    deadline = time.monotonic() + timeout_s
    report: dict[str, Any] = {
        "device": card.name() if card else f"cpu ({os.cpu_count()} cores)", "model": model, "trials": trials,
        "steps": steps, "batch_size": batch_size, "seq": seq, "full_rows": full,
        "build": build_model(model, max(60.0, timeout_s / 4)),
    }
    runs = [("serial", False), ("packed", True)] + ([("packed_mps", True)] if mps else [])
    timed = len(runs) if gpu else 2  # on a CPU the MPS run is only recorded as skipped
    with tempfile.TemporaryDirectory(prefix="qsweep-packing-") as tmp:
        for index, (name, packed) in enumerate(runs):
            left = deadline - time.monotonic()
            share = left / 2 if name == "serial" else left / max(1, timed - index)
            folder = Path(tmp) / name
            folder.mkdir()
            path = sweep_file(folder, name, model, trials, steps, packed, gpu, batch_size, seq, full)
            if name == "packed_mps":
                why_not = start_mps() if gpu else "MPS is for CUDA devices"
                if why_not:
                    report[name] = {"skipped": why_not}
                    continue
                try:
                    report[name] = run_sweep(path, card, share, ignore=frozenset(mps_processes()))
                finally:
                    stop_mps()
            else:
                report[name] = run_sweep(path, card, share)
    serial, packed = report["serial"], report["packed"]
    report.update(ratios(serial, packed))
    if "trials_per_hour" in report.get("packed_mps", {}):
        report["packed_mps"].update(ratios(serial, report["packed_mps"]))
    report["goals"] = goals(serial, packed) if gpu else None
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a qsweep model, or llama-1b / llama-8b")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64, help="max_seq_length")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cpu")
    parser.add_argument("--mps", action="store_true",
                        help="the packed sweep again under NVIDIA MPS (on a CPU: recorded as skipped)")
    parser.add_argument("--full-rows", action=argparse.BooleanOptionalAction, default=None,
                        help="fill every row to --seq (default: on for cuda, off for cpu)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="for all the sweeps together")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if not gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    report = compare(MODELS.get(args.model, args.model), args.trials, args.steps, args.batch_size, args.seq, gpu,
                     gpu if args.full_rows is None else args.full_rows, args.mps, args.timeout_s)
    emit(report, args.out)


if __name__ == "__main__":
    main()
