"""The memory estimate from the data's real token lengths against the peaks real trials measure.

Each trial runs `train.trial.run_trial` in a fresh process with one torch thread and the glibc
setting of a sweep's workers, as a sweep's trial does, so its `peak_memory_mb` (train.trial.PeakMemory:
model tensors + growth of the peak resident set while training) is its own. Side by side, per trial:

- measured: the trial's peak_memory_mb;
- sized: the estimate a sweep's driver gives Ray, from the length profile of the data
  (resources.packing.sized_estimate), and the trial's own logged one (memory_estimate_mb, from its
  exact tokenized rows);
- at_max_seq_length: the same estimate with every row at max_seq_length (the length qsweep sized
  activations for before).

Two cases: the quickstart (sweeps/quickstart.yaml as it stands: zorble's 93 short rows, max_seq_length
64, its steps x 8 rows) over its search space's extremes, and a mixed set (400 rows, 30% of them with a
long context, max_seq_length 256, 6 steps x 4 rows and an evaluation every 3 steps), where the trial
reads 24 of 400 rows and the rule of train.lengths picks the length. Scoring is cut to 4 zorble
items: it runs after the peak is read and does not change it. Memory peaks are not skewed by other
work on the machine, so figures taken under load stand.

    python bench/estimate_lengths.py --out bench/results/estimate_lengths_cpu.json
    python bench/estimate_lengths.py --model tiny-llama --out bench/results/estimate_lengths_cpu_tiny.json
    # an 8-layer random Llama (hidden 512, 8k vocabulary: tests/test_estimate.py's "v8k") in FOLDER
    python bench/estimate_lengths.py --model FOLDER --long-words 10 25 \
        --out bench/results/estimate_lengths_cpu_llama8.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import emit, machine

REPO = Path(__file__).resolve().parent.parent
ZORBLE = REPO / "evaluation" / "tasks" / "zorble"
TOLERANCE = 0.25

# The quickstart's search space at its edges: ranks 4..64, each target preset, nf4 and fp4, double
# quantization on and off, dropout 0..0.1 (its two baselines first).
QUICKSTART_CONFIGS = [
    {"lora.r": 16, "lora.target_modules": "all-linear"},
    {"quantization.quant_type": "fp4", "quantization.double_quant": False, "lora.r": 16},
    {"lora.r": 4, "lora.target_modules": "attention", "lora.dropout": 0.0},
    {"lora.r": 64, "lora.target_modules": "all-linear", "quantization.quant_type": "fp4",
     "quantization.double_quant": False, "lora.dropout": 0.1},
    {"lora.r": 64, "lora.target_modules": "mlp", "lora.dropout": 0.0},
    {"lora.r": 8, "lora.target_modules": "attention", "quantization.quant_type": "fp4"},
    {"lora.r": 32, "lora.target_modules": "mlp", "quantization.quant_type": "fp4", "lora.dropout": 0.1},
    {"lora.r": 4, "lora.target_modules": "all-linear", "quantization.double_quant": False},
]
MIXED_CONFIGS = [
    {"lora.r": 16, "lora.target_modules": "all-linear"},
    {"lora.r": 64, "lora.target_modules": "all-linear", "quantization.quant_type": "fp4", "lora.dropout": 0.1},
    {"lora.r": 4, "lora.target_modules": "attention", "lora.dropout": 0.0},
]
# Long contexts in words, per model: tiny-llama's small tokenizer spends ~5 tokens on a word, SmolLM2's ~1.2;
# either way the long rows end well short of max_seq_length 256.
LONG_WORDS = {"tiny-llama": (10, 25)}
DEFAULT_LONG_WORDS = (40, 90)
WORDS = ("the river runs past an old mill where farmers bring grain every autumn and children watch "
         "wheels turn slowly while stories about distant cities travel from one village to the next").split()


def mixed_rows(count: int, seed: int, long_share: float = 0.3, long_words: tuple[int, int] = (40, 90)) -> list[dict]:
    """zorble rows, a `long_share` of them behind a context of `long_words` words, the rest bare."""
    rng = random.Random(seed)
    base = [json.loads(line) for line in (ZORBLE / "train.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for index in range(count):
        row = dict(base[index % len(base)])
        words = rng.randint(*long_words) if rng.random() < long_share else 0
        row["context"] = " ".join(rng.choices(WORDS, k=words)) + "\n" if words else ""
        rows.append(row)
    return rows


def mixed_sweep(folder: Path, model: str, long_words: tuple[int, int] | None = None) -> dict:
    """A sweep over mixed rows: the quickstart's settings but for the data and the steps."""
    long_words = long_words or LONG_WORDS.get(model, DEFAULT_LONG_WORDS)
    for name, count, seed in (("train", 400, 0), ("validation", 40, 1)):
        rows = mixed_rows(count, seed, long_words=long_words)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "name": "mixed", "model": {"name": model},
        "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl"),
                 "prompt": "{context}Q: {question}\nA:", "completion": " {answer}", "max_seq_length": 256},
        "training": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "learning_rate": 1e-3},
    }


def quickstart_sweep(model: str) -> dict:
    from qsweep.config.schema import read_yaml

    sweep = read_yaml(REPO / "sweeps" / "quickstart.yaml")
    sweep["model"] = {"name": model}
    for field in ("train", "validation"):
        sweep["data"][field] = str((REPO / "sweeps" / sweep["data"][field]).resolve())
    return {k: v for k, v in sweep.items() if k in ("name", "model", "data", "quantization", "lora", "training")}


def trial_of(sweep: dict, params: dict):
    from qsweep.config.schema import TrialConfig
    from qsweep.search.space import apply_params

    base = TrialConfig(**{k: v for k, v in sweep.items() if k != "name"},
                       evaluation={"tasks": ["zorble"], "limit": 4})
    return apply_params(base, params)


def worker(spec: dict) -> dict:
    """One trial in this process: its logged metrics."""
    import torch

    torch.set_num_threads(1)
    from qsweep.train.trial import run_trial

    outcome = run_trial(trial_of(spec["sweep"], spec["params"]), REPO, Path(spec["out"]), report=lambda _: None)
    keep = ("peak_memory_mb", "memory_estimate_mb", "memory_estimate_seq_length", "train_seconds")
    return {k: outcome.metrics[k] for k in keep}


def measure(spec: dict, folder: Path) -> dict:
    folder.mkdir(parents=True)
    spec_file = folder / "spec.json"
    spec_file.write_text(json.dumps({**spec, "out": str(folder / "trial")}))
    # As a sweep's Ray worker runs (orchestrate.driver.connect_ray sets glibc's mmap threshold to 4 MiB):
    # without it glibc keeps freed tensor memory resident, and the peak would measure the heap's history.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_file)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"trial {spec['params']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(case: str, sweep: dict, params: dict, measured: dict) -> dict:
    """One row: the estimates next to the measured peak."""
    from qsweep.resources.packing import sized_estimate, trial_estimate
    from qsweep.train.models import resolve_model

    trial = trial_of(sweep, params)
    path = resolve_model(trial.model.name).path
    sized = sized_estimate(trial, REPO, path, "cpu")
    at_max = trial_estimate(trial, path, "cpu")
    peak = measured["peak_memory_mb"]
    return {
        "case": case, "params": params, "measured_peak_mb": round(peak, 1),
        "sized_estimate_mb": round(sized.total, 1), "ratio_sized": round(sized.total / peak, 3),
        "trial_logged_estimate_mb": round(measured["memory_estimate_mb"], 1),
        "ratio_trial_logged": round(measured["memory_estimate_mb"] / peak, 3),
        "at_max_seq_length_mb": round(at_max.total, 1), "ratio_at_max_seq_length": round(at_max.total / peak, 3),
        "sizing": sized.sequence.describe(), "trial_seq_length": measured["memory_estimate_seq_length"],
        "components_mb": {k: round(v, 1) for k, v in sized.model_dump().items()
                          if k in ("quantized_weights", "unquantized_weights", "lora_params", "lora_grads",
                                   "optimizer_state", "activations", "runtime_overhead", "heap_slack")},
        "train_seconds_under_load": round(measured["train_seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", nargs="+", choices=["quickstart", "mixed"], default=["quickstart", "mixed"])
    parser.add_argument("--configs", type=int, help="only the first N configs of each case")
    parser.add_argument("--long-words", type=int, nargs=2, help="words in a long row's context (default by model)")
    parser.add_argument("--parallel", type=int, default=2, help="trials measured at once (one core each)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker.read_text()))))
        return
    from qsweep.train.models import resolve_model

    resolve_model(args.model)  # build an embedded model once, before the workers race to
    with tempfile.TemporaryDirectory(prefix="qsweep-lengths-") as tmp:
        sweeps = {"quickstart": (quickstart_sweep(args.model), QUICKSTART_CONFIGS),
                  "mixed": (mixed_sweep(Path(tmp), args.model, args.long_words), MIXED_CONFIGS)}
        jobs = [(case, sweeps[case][0], params) for case in args.cases
                for params in sweeps[case][1][: args.configs]]
        with ThreadPoolExecutor(args.parallel) as pool:
            measured = list(pool.map(lambda ij: measure({"sweep": ij[1][1], "params": ij[1][2]},
                                                        Path(tmp) / f"trial-{ij[0]}"), enumerate(jobs)))
        rows = [compare(case, sweep, params, got) for (case, sweep, params), got in zip(jobs, measured)]
    worst = {key: max(abs(r[key] - 1) for r in rows) for key in ("ratio_sized", "ratio_trial_logged",
                                                                  "ratio_at_max_seq_length")}
    report = {"machine": machine(), "model": args.model, "tolerance": TOLERANCE, "rows": rows,
              "worst_relative_error": {k: round(v, 3) for k, v in worst.items()},
              "load_average_1m_at_end": os.getloadavg()[0],
              "reading": "ratio = estimate / measured peak (CPU, MiB); sized = from the data's token lengths"}
    emit(report, args.out)


if __name__ == "__main__":
    main()
