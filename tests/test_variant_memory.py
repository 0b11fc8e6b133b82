"""The memory estimate of DoRA and of LoRA on a mixture-of-experts model's fused experts, against the
allocator peak of real QLoRA training steps on the CPU, measured as tests/test_estimate.py measures
(tensor bytes of the loaded 4-bit + LoRA model + the peak of torch's CPU allocator during two
Trainer steps, in a fresh process each), within its 15%.

DoRA keeps, per wrapped layer, the base and the scaled LoRA outputs (and with dropout the
dequantized weight): about twice plain LoRA's activations here. LoRA on fused experts keeps each
expert stack with its delta folded in, and the experts' inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15

LLAMA = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024, vocab_size=1024, tie_word_embeddings=False)
MOE = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024,
           tie_word_embeddings=False, max_position_embeddings=1024)
CONFIGS = [
    dict(name="dora-dropout", model="llama", lora={"use_dora": True, "dropout": 0.05}),
    dict(name="dora", model="llama", lora={"use_dora": True, "dropout": 0.0}),
    dict(name="dora-gc", model="llama", lora={"use_dora": True, "dropout": 0.05}, gc=True),
    dict(name="moe-attention", model="moe", lora={"target_modules": "attention", "dropout": 0.0}),
    dict(name="moe-experts", model="moe", lora={"target_modules": "mlp", "dropout": 0.0}),
    dict(name="moe-all-gc", model="moe", lora={"target_modules": "all-linear", "dropout": 0.0}, gc=True),
]


def _trial(spec: dict):
    from qsweep.config.schema import TrialConfig

    return TrialConfig(data={"train": "unused.jsonl", "max_seq_length": 256},
                       quantization={"compute_dtype": "float32"}, lora={"r": 16, **spec["lora"]},
                       training={"max_steps": 2, "batch_size": 4, "warmup_ratio": 0.0,
                                 "gradient_checkpointing": spec.get("gc", False)})


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3MoeConfig

    folders = {}
    for name, config in (("llama", LlamaConfig(**LLAMA)), ("moe", Qwen3MoeConfig(**MOE))):
        torch.manual_seed(0)
        folders[name] = tmp_path_factory.mktemp(name)
        config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
        AutoModelForCausalLM.from_config(config).save_pretrained(folders[name])
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folders[name])
    return folders


def _measure(spec: dict, model_path: Path, out_dir: Path) -> dict:
    """In a fresh process: the 4-bit base with the trial's LoRA, two Trainer steps, the allocator peak."""
    import torch

    torch.set_num_threads(1)
    import datasets
    from test_estimate import _model_tensor_bytes
    from torch.profiler import ProfilerActivity, profile
    from transformers import Trainer

    from qsweep.train.lora import attach_trial_lora, trial_targets
    from qsweep.train.trial import load_base, training_arguments

    trial = _trial(spec)
    model, _ = load_base(model_path, trial.quantization)
    model = attach_trial_lora(model, trial.lora, trial_targets(trial.lora, model_path),
                              trial.training.gradient_checkpointing)
    model_mib = _model_tensor_bytes(model) / 2**20
    ids = torch.randint(1, 1024, (8, 256), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist()})
    args = training_arguments(trial.training, out_dir, torch.float32, has_eval=False)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train()
    trace = out_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    trace.unlink()
    return {"allocator_peak_mib": model_mib + max(e["args"]["Total Allocated"] for e in events
                                                  if e.get("name") == "[memory]") / 2**20}


def _in_fresh_process(spec: dict, model_path: Path, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, __file__, json.dumps(spec), str(model_path), str(out_dir)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"measuring {spec['name']} failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_dora_and_expert_estimates_within_15_percent_of_the_allocator_peak(models, tmp_path):
    from qsweep.resources.estimate import estimate_trial_memory

    with ThreadPoolExecutor(max_workers=2) as pool:
        measured = list(pool.map(lambda s: _in_fresh_process(s, models[s["model"]], tmp_path / s["name"]), CONFIGS))
    rows = [(spec["name"], estimate_trial_memory(_trial(spec), models[spec["model"]], "cpu").tensors,
             got["allocator_peak_mib"]) for spec, got in zip(CONFIGS, measured)]
    table = "\n".join(f"{name:<14} estimate {est:7.1f} MiB  allocator peak {peak:7.1f} MiB  ratio {est / peak:.3f}"
                      for name, est, peak in rows)
    print(table)
    for name, est, peak in rows:
        assert abs(est / peak - 1) <= TOLERANCE, f"{name} off:\n{table}"


if __name__ == "__main__":
    spec_arg, model_arg, out_arg = sys.argv[1:4]
    print(json.dumps(_measure(json.loads(spec_arg), Path(model_arg), Path(out_arg))))
