"""One trial at a time vs. packed by qsweep: the same sweep twice, side by side, in one run.

Prints JSON: trials finished per hour, memory used over time (mean and peak, as a share of the
device), tokens/s summed over trials, OOM count, and the packed/serial ratios. On a GPU machine it
uses the GPU (one trial per GPU vs. qsweep's memory-sized shares); on a CPU machine it runs the same
code path with CPU slots (one trial with every core vs. one core per trial, memory-sized).

    python bench/packing.py                       # tiny random Llama, 8 trials (CPU: ~3 min)
    python bench/packing.py --model smollm2-135m --trials 8 --steps 40
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

REPO = Path(__file__).resolve().parent.parent
ZORBLE = REPO / "evaluation" / "tasks" / "zorble"


def sweep_file(folder: Path, name: str, model: str, trials: int, steps: int, packed: bool, gpu: bool) -> Path:
    cores = os.cpu_count() or 1
    resources = ({"cpus_per_trial": 1, "gpus_per_trial": "auto"} if packed else {"cpus_per_trial": 1, "gpus_per_trial": 1})
    if not gpu:
        resources = {"cpus_per_trial": 1} if packed else {"cpus_per_trial": cores}
    ranks = [4, 8, 16, 32, 64, 8, 16, 32]
    sweep = {
        "name": name,
        "model": {"name": model},
        "data": {"train": str(ZORBLE / "train.jsonl"), "validation": str(ZORBLE / "validation.jsonl"),
                 "prompt": "Q: {question}\nA:", "completion": " {answer}", "max_seq_length": 64},
        "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 1.0e-3, "eval_every": max(1, steps // 2)},
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
    proc = subprocess.run([str(Path(sys.executable).with_name("qsweep")), "run", str(path)], cwd=path.parent,
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
        "memory_estimates_mb": sorted(r.data.metrics.get("memory_estimate_mb", 0) for r in finished),
        "peaks_mb": sorted(r.data.metrics.get("peak_memory_mb", 0) for r in finished),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(prefix="qsweep-bench-") as tmp:
        results = {}
        for name, packed in (("serial", False), ("packed", True)):
            folder = Path(tmp) / name
            folder.mkdir()
            results[name] = run_one(sweep_file(folder, name, args.model, args.trials, args.steps, packed, gpu), gpu)
    serial, packed = results["serial"], results["packed"]
    print(json.dumps({
        "device": device, "model": args.model, "trials": args.trials, "steps": args.steps,
        "serial": serial, "packed": packed,
        "ratio_trials_per_hour": packed["trials_per_hour"] / serial["trials_per_hour"],
        "ratio_tokens_per_second": packed["tokens_per_second_summed"] / max(serial["tokens_per_second_summed"], 1e-9),
    }, indent=2))


if __name__ == "__main__":
    main()
