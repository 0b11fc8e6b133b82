"""The architecture matrix: tiny random Qwen2, Qwen3, Gemma 2, Gemma 3, Mistral, Phi-3, GPT-NeoX,
OLMo 2 and two mixture-of-experts models (Qwen3-MoE; Qwen2-MoE, whose router and shared-expert gate
are Linear layers), built from transformers' own configs (tests/architectures.py).

Fast: every preset wraps, with peft, exactly the layers the model's own attention and MLP blocks
hold (read from the modules, not from qsweep's resolver), the experts of a mixture-of-experts model
through target_parameters and its router never; the estimate counts exactly the parameters peft
trains; `qsweep validate` refuses what peft cannot train on experts and says what to set.
Slow: two training steps through qsweep's own trial (4-bit load, LoRA, Trainer) on each, with the
estimate within 25% of the peak the trial measures, rows filling max_seq_length.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from architectures import ARCHITECTURES, MOE_ARCHITECTURES, build_architecture
from typer.testing import CliRunner

from qsweep.cli import app

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("attention", "mlp", "all-linear")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    return {name: build_architecture(name, root / name, tiny_llama) for name in ARCHITECTURES}


def expected_targets(name: str, model, preset: str) -> tuple[set[str], set[str]]:
    """(Linear layers, fused expert weights) the preset should reach, from the model's own blocks:
    every Linear inside each decoder layer's attention and/or MLP module (a router excepted), and
    every 3-D parameter of its experts."""
    import torch

    arch = ARCHITECTURES[name]
    routers = set((arch.router or "").split(","))
    linears, experts = set(), set()
    for index, layer in enumerate(model.get_submodule(arch.layers)):
        blocks = {"attention": [arch.attention], "mlp": [arch.mlp]}.get(preset, [arch.attention, arch.mlp])
        for block in blocks:
            prefix = f"{arch.layers}.{index}.{block}"
            for sub, module in layer.get_submodule(block).named_modules():
                if isinstance(module, torch.nn.Linear) and not (block == arch.mlp and sub in routers):
                    linears.add(f"{prefix}.{sub}")
                if block == arch.mlp and sub == "experts":
                    experts |= {f"{prefix}.experts.{p}" for p, w in module.named_parameters(recurse=False)
                                if w.ndim == 3}
    return linears, experts


def wrapped_by_peft(peft_model) -> tuple[set[str], set[str]]:
    """(Linear layers, parameters) carrying a LoRA adapter, by their names in the base model."""
    def base_name(name: str) -> str:
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    linears, parameters = set(), set()
    for name, module in peft_model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            parameters.add(f"{base_name(name)}.{module.parameter_name}")
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            linears.add(base_name(name))
    return linears, parameters


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_preset_wraps_the_models_own_blocks_and_the_estimate_counts_them(models, name, preset):
    import torch
    from transformers import AutoModelForCausalLM

    from qsweep.config.schema import TrialConfig
    from qsweep.resources.estimate import estimate_trial_memory
    from qsweep.train.lora import attach_trial_lora, trial_targets

    trial = TrialConfig(data={"train": "unused.jsonl"}, lora={"r": 4, "dropout": 0.0, "target_modules": preset})
    model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
    want_linears, want_experts = expected_targets(name, model, preset)
    peft_model = attach_trial_lora(model, trial.lora, trial_targets(trial.lora, models[name]), checkpointing=False)
    linears, parameters = wrapped_by_peft(peft_model)

    assert linears == want_linears
    assert parameters == want_experts
    assert linears or parameters
    if name in MOE_ARCHITECTURES:
        assert bool(parameters) == (preset != "attention"), "the experts are MLP weights"
        routers = ARCHITECTURES[name].router.split(",")
        assert not any(n.rsplit(".", 1)[-1] in routers for n in linears | {p.rsplit(".", 1)[0] for p in parameters})
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert estimate_trial_memory(trial, models[name], "cpu").lora_param_count == trainable


def _validate(sweep: dict, folder: Path) -> tuple[int, str]:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, " ".join(result.output.split())


def test_validate_refuses_what_peft_cannot_train_on_experts_and_says_what_to_set(models, tiny_sweep_dict, tmp_path):
    tiny_sweep_dict["model"]["name"] = str(models["qwen3_moe"])
    tiny_sweep_dict["search"]["space"] = None
    tiny_sweep_dict["lora"] = {"target_modules": "mlp", "dropout": 0.0}
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 0, output

    tiny_sweep_dict["lora"] = {"target_modules": "mlp", "dropout": 0.05, "use_dora": True}
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 2, output
    assert "matches no linear layer" not in output
    assert ("lora.dropout = 0.05 with lora.target_modules = 'mlp' reaches this mixture-of-experts model's experts, "
            "fused weights such as model.layers.0.mlp.experts.gate_up_proj") in output
    assert "set lora.dropout: 0, or lora.target_modules: attention" in output
    assert "lora.use_dora = true with lora.target_modules = 'mlp'" in output
    assert "set lora.use_dora: false, or lora.target_modules: attention" in output

    # Attention alone never reaches the experts: dropout and DoRA are fine there.
    tiny_sweep_dict["lora"]["target_modules"] = "attention"
    assert _validate(tiny_sweep_dict, tmp_path)[0] == 0


def test_a_space_that_can_pair_dropout_with_the_experts_is_refused(models, tiny_sweep_dict, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"lora.target_modules": {"choices": ["attention", "all-linear"]},
                                                "lora.dropout": {"choices": [0.0, 0.1]}}}))
    tiny_sweep_dict["model"]["name"] = str(models["qwen3_moe"])
    tiny_sweep_dict["search"]["space"] = str(space)
    tiny_sweep_dict["lora"] = {"dropout": 0.0}
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 2, output
    assert "search.space: lora.dropout = 0.1 with lora.target_modules = 'all-linear'" in output
    assert "lora.dropout = 0.1 with lora.target_modules = 'attention'" not in output


# ---------------------------------------------------------------------------------------------
# Slow: two real QLoRA steps through run_trial on each architecture.

SEQ, BATCH = 512, 4


def _long_rows(path: Path) -> Path:
    """Rows far longer than SEQ tokens: each is cut to exactly SEQ (the prompt's start is dropped)."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog zorble of seven twelve".split()
    path.write_text("".join(json.dumps({"question": " ".join(rng.choice(words) for _ in range(600)),
                                        "answer": str(i)}) + "\n" for i in range(16)))
    return path


def _trial_in_fresh_process(model: Path, data: Path, out_dir: Path) -> dict:
    """run_trial in its own process, set up as a Ray worker is (one thread, glibc's mmap threshold),
    so its peak is its own."""
    trial = {
        "model": {"name": str(model)},
        "data": {"train": str(data), "prompt": "{question}", "completion": " {answer}", "max_seq_length": SEQ},
        "quantization": {"compute_dtype": "float32"},
        "lora": {"r": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": 2, "batch_size": BATCH, "warmup_ratio": 0.0},
        "evaluation": {"tasks": ["zorble"], "limit": 1},
    }
    code = ("import json, sys, torch; from pathlib import Path; torch.set_num_threads(1)\n"
            "from qsweep.config.schema import TrialConfig; from qsweep.train.trial import run_trial\n"
            "trial = TrialConfig(**json.loads(sys.argv[1]))\n"
            "out = run_trial(trial, Path(sys.argv[2]), Path(sys.argv[3]), lambda r: None)\n"
            "print(json.dumps(out.metrics))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, json.dumps(trial), str(REPO), str(out_dir)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_qlora_steps_on_every_architecture_within_25_percent_of_the_estimate(models, tmp_path):
    data = _long_rows(tmp_path / "long.jsonl")
    names = list(ARCHITECTURES)
    with ThreadPoolExecutor(max_workers=2) as pool:
        measured = dict(zip(names, pool.map(lambda n: _trial_in_fresh_process(models[n], data, tmp_path / n), names)))
    table = "\n".join(f"{n:<10} peak {m['peak_memory_mb']:6.1f} MiB  estimate {m['memory_estimate_mb']:6.1f} MiB  "
                      f"ratio {m['memory_ratio']:.3f}" for n, m in measured.items())
    print(table)
    for name, metrics in measured.items():
        assert metrics["train_steps"] == 2, name
        assert math.isfinite(metrics["train_loss"]), name
        assert abs(metrics["memory_ratio"] - 1) <= 0.25, f"{name}:\n{table}"
