"""The untuned embedded model's full offline MMLU (all 14,042 test questions, 0-shot), in fp32.

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
    torch.set_num_threads(threads)
    model_info = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(model_info.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_info.path)
    tick = time.perf_counter()
    result = evaluate_model(model, tokenizer, [GROUP], include_dirs([], Path.cwd()), batch_size=batch)
    wall = time.perf_counter() - tick
    questions = sum(len(items) for task, items in result.samples.items())
    scores = {k: v for k, v in result.scores.items()
              if k.split("/")[0] in {GROUP, *(f"{GROUP}_{c}" for c in ("stem", "humanities", "social_sciences", "other"))}}
    figures = {
        "model": "smollm2-135m (untuned, fp32)", "model_hash": model_info.content_hash, "task": GROUP,
        "num_fewshot": 0, "questions": questions, "scores": scores, "wall_seconds": round(wall, 1),
        "questions_per_second": round(questions / wall, 2), "batch_size": batch, "torch_threads": threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "note": "measured under load: the 2 cores were shared with six other processes working at once",
        "python": sys.version.split()[0], "torch": torch.__version__,
    }
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
