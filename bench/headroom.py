"""Headroom for a shared-base executor: K trials' batches through one 4-bit base vs K processes.

Today qsweep packs K trials as K processes, each with its own copy of the 4-bit base. A shared-base
executor would run the K trials' batches through one base in one process (the base matmuls on K
batches at once; each trial's LoRA on its own rows, which costs little). This measures what that
could gain, side by side in one run, for each K:

- shared: one process, one base + LoRA, one training step on a batch of K x B rows;
- processes: K processes started together, each one training step on its own batch of B rows.

Both do the same K x B rows of work per step; `ratio` = shared step time / processes step time
(below 1: sharing the base is faster). Every process uses the same threads in total (the machine's
cores, split between the K processes). Prints JSON.

    python bench/headroom.py                                 # tiny random Llama, K = 1, 2, 4, 8
    python bench/headroom.py --model smollm2-135m --ks 1 2 --out bench/results/headroom_cpu.json
    python bench/headroom.py --device cuda --model llama-1b --batch-size 4 --seq 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import emit, machine

MODELS = {"llama-1b": "random-llama-1b", "llama-8b": "random-llama-8b"}


def worker(spec: dict) -> dict:
    """One process: a 4-bit base with LoRA, `steps` timed training steps on random tokens."""
    import torch

    torch.set_num_threads(spec["threads"])
    from qsweep.config.policy import optimizer_name
    from qsweep.config.schema import QuantizationConfig
    from qsweep.train.models import resolve_model
    from qsweep.train.lora import attach_lora
    from qsweep.train.targets import linear_module_names, resolve_target_modules
    from qsweep.train.trial import device_type, load_base, resolve_compute_dtype

    path = resolve_model(spec["model"]).path
    quant = QuantizationConfig()
    model, _ = load_base(path, quant)
    model = attach_lora(model, 16, 32, 0.0, resolve_target_modules("all-linear", linear_module_names(path)), False)
    model.train()
    device = device_type()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = optimizer_name("auto", device) == "adamw_torch_fused"
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    vocab = min(model.config.vocab_size, 512)  # the embedded tokenizers' range
    ids = torch.randint(1, vocab, (spec["rows"], spec["seq"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    dtype = resolve_compute_dtype(quant.compute_dtype)

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(spec["warmup"]):
        step()
    # All K processes start their timed steps together, so they run side by side.
    Path(spec["ready"]).touch()
    while not Path(spec["go"]).exists():
        time.sleep(0.01)
    started = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    seconds = (time.perf_counter() - started) / spec["steps"]
    return {"step_seconds": seconds, "compute_dtype": str(dtype).removeprefix("torch."),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def run_group(count: int, rows: int, args: argparse.Namespace, folder: Path) -> list[dict]:
    """`count` worker processes, each on `rows` rows, released together once all are loaded."""
    threads = max(1, (os.cpu_count() or 1) // count)
    folder.mkdir()
    go = folder / "go"
    procs = []
    for index in range(count):
        spec = {"model": args.model, "rows": rows, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                "threads": threads, "ready": str(folder / f"ready-{index}"), "go": str(go)}
        spec_file = folder / f"spec-{index}.json"
        spec_file.write_text(json.dumps(spec))
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(spec_file)],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True), spec))
    while not all(Path(spec["ready"]).exists() for _, spec in procs):
        if any(proc.poll() not in (None, 0) for proc, _ in procs):
            raise RuntimeError("a worker failed before its timed steps; run it alone with --worker to see why")
        time.sleep(0.05)
    go.touch()
    results = []
    for proc, _ in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a worker exited with {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a qsweep model, or llama-1b / llama-8b")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=4, help="rows per trial's batch (B)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per K; medians reported")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker.read_text()))))
        return
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("--device cuda: torch sees no CUDA device here\n")
        sys.exit(2)
    args.model = MODELS.get(args.model, args.model)
    from qsweep.train.models import resolve_model

    resolve_model(args.model)  # build an embedded model once, before the workers race to
    rows = []
    with tempfile.TemporaryDirectory(prefix="qsweep-headroom-") as tmp:
        for k in args.ks:
            # Shared and apart alternate, and each figure is the median of the repeats, so a burst
            # of other work on the machine skews one sample, not the comparison.
            shared_steps, apart_steps = [], []
            for repeat in range(args.repeats):
                shared = run_group(1, k * args.batch_size, args, Path(tmp) / f"shared-{k}-{repeat}")[0]
                apart = run_group(k, args.batch_size, args, Path(tmp) / f"processes-{k}-{repeat}")
                shared_steps.append(shared["step_seconds"])
                # The K processes step side by side: one round of all K takes as long as the slowest.
                apart_steps.append(max(r["step_seconds"] for r in apart))
            shared_step, apart_step = statistics.median(shared_steps), statistics.median(apart_steps)
            rows.append({"k": k, "shared_step_seconds": shared_step, "processes_step_seconds": apart_step,
                         "ratio": shared_step / apart_step, "repeats": args.repeats,
                         "compute_dtype": shared["compute_dtype"], "shared_peak_gpu_mb": shared["peak_gpu_mb"],
                         "processes_peak_gpu_mb": [r["peak_gpu_mb"] for r in apart]})
    report = {"machine": machine(), "model": args.model, "batch_size": args.batch_size, "seq": args.seq,
              "steps": args.steps, "rows": rows,
              # Other work on the machine skews step times; a load well above the core count makes them noise.
              "load_average_1m_at_end": os.getloadavg()[0],
              "reading": "ratio = shared step / K-process step, same K x B rows; below 1, a shared base is faster"}
    emit(report, args.out)


if __name__ == "__main__":
    main()
