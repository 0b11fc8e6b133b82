"""The untuned embedded model's full offline MMLU (all 14,042 test questions, 0-shot), in fp32 or
$DTYPE (bfloat16 is the fast one on CPUs with AMX-BF16).

Prints JSON (accuracy ± stderr for the group and its four categories, wall time, questions/s) and
writes bench/results/mmlu_base_cpu.json. Run it with `nice -n 19 python bench/mmlu_base.py`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "mmlu_base_cpu.json"


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qsweep.evaluate.harness import evaluate_model, include_dirs
    from qsweep.evaluate.mmlu import GROUP
    from qsweep.train.models import resolve_model

    threads = int(os.environ.get("THREADS", "2"))
    batch = int(os.environ.get("BATCH", "16"))
    dtype = os.environ.get("DTYPE", "float32")
    torch.set_num_threads(threads)
    model_info = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(model_info.path, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_info.path)
    tick = time.perf_counter()
    result = evaluate_model(model, tokenizer, [GROUP], include_dirs([], Path.cwd()), batch_size=batch)
    wall = time.perf_counter() - tick
    questions = sum(len(items) for task, items in result.samples.items())
    scores = {k: v for k, v in result.scores.items()
              if k.split("/")[0] in {GROUP, *(f"{GROUP}_{c}" for c in ("stem", "humanities", "social_sciences", "other"))}}
    figures = {
        "model": f"smollm2-135m (untuned, {dtype})", "model_hash": model_info.content_hash, "task": GROUP,
        "num_fewshot": 0, "questions": questions, "scores": scores, "wall_seconds": round(wall, 1),
        "questions_per_second": round(questions / wall, 2), "batch_size": batch, "torch_threads": threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        # Other work on the machine inflates the wall time: the load says how busy it was.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0], "torch": torch.__version__,
    }
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
