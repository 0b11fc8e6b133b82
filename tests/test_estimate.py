"""The memory estimator against real QLoRA training on the CPU.

What is measured, and why: a CPU process's ru_maxrss is mostly the interpreter and its libraries
(~550 MiB here) plus fp32 weights that exist only while the model is being quantized, so no
estimate of training memory could be held to +/-15% against it (trial.PeakMemory, which every
trial logs, therefore measures the same way as the RSS cross-check below). The GPU
figure the estimator stands for is torch.cuda.max_memory_allocated: bytes of live tensors at their
peak. Its CPU twin is measured here as

    allocator peak = tensor bytes of the loaded 4-bit + LoRA model (params, buffers, quant states)
                   + peak of live bytes allocated through torch's CPU allocator during training
                     (torch.profiler with profile_memory tracks every allocation and free)

and compared with the estimate's tensor part (total minus runtime overhead). As a cross-check that
the allocator view misses nothing large (bitsandbytes kernels, oneDNN buffers, Python objects),

    RSS peak = the same tensor bytes + growth of the peak resident set during training

(the peak is reset after loading through /proc/self/clear_refs, and glibc's mmap threshold is pinned
so freed tensors go back to the OS instead of staying in the heap) is compared with the full
estimate, runtime overhead included. Each config runs in a fresh process so peaks do not mix.

The models are random Llamas of ~25M 4-bit parameters, large enough that tensors dominate every
measure, fed random token ids padded the way the trial's collator pads.

bench/results/estimator_cpu.json comes from
    QSWEEP_ESTIMATOR_RESULTS=bench/results/estimator_cpu.json pytest tests/test_estimate.py -k measured -s
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

# The estimate is exercised across what a sweep varies: rank, target preset, batch, sequence,
# checkpointing, optimizer, quant type and double quantization, dropout on and off.
# Two models: "v8k" (8k vocabulary, tied embeddings), where the loss's [tokens x vocab] buffers set
# the peak as they do for small real models, and "v1k" (1k vocabulary, separate head), where one
# layer's backward does, as for large models under gradient checkpointing.
CONFIGS: list[dict] = [
    dict(name="base", r=16, targets="all-linear", batch=4, seq=256, gc=False),
    dict(name="r64-attention", r=64, targets="attention", batch=2, seq=256, gc=False),
    dict(name="r8-mlp-seq512-fp4", r=8, targets="mlp", batch=2, seq=512, gc=False, quant="fp4", dq=False),
    dict(name="b8-gc", r=16, targets="all-linear", batch=8, seq=128, gc=True),
    dict(name="r4-attention-seq512-gc", r=4, targets="attention", batch=2, seq=512, gc=True, quant="fp4"),
    dict(name="r32-all-adamw8bit", r=32, targets="all-linear", batch=2, seq=256, gc=False, optim="adamw_8bit"),
    dict(name="mlp-b8-gc-paged8bit", r=16, targets="mlp", batch=8, seq=128, gc=True, optim="paged_adamw_8bit"),
    dict(name="no-dropout-b1-seq1024", r=16, targets="all-linear", batch=1, seq=1024, gc=False, dropout=0.0,
         dq=False),
    dict(name="v1k-b8-gc", model="v1k", r=16, targets="all-linear", batch=8, seq=256, gc=True),
    # bf16 compute on the CPU: only the dequantized weight shrinks, activations stay fp32.
    dict(name="v1k-attention-bf16", model="v1k", r=32, targets="attention", batch=4, seq=256, gc=False,
         compute="bfloat16"),
]

LAYERS = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
)
MODELS = {
    "v8k": dict(vocab_size=8192, tie_word_embeddings=True),
    "v1k": dict(vocab_size=1024, tie_word_embeddings=False),
}


def _trial_config(spec: dict):
    from qsweep.config.schema import TrialConfig

    return TrialConfig(
        data={"train": "unused.jsonl", "max_seq_length": spec["seq"]},
        quantization={"quant_type": spec.get("quant", "nf4"), "double_quant": spec.get("dq", True),
                      "compute_dtype": spec.get("compute", "auto")},
        lora={"r": spec["r"], "alpha": 2 * spec["r"], "dropout": spec.get("dropout", 0.05),
              "target_modules": spec["targets"]},
        training={"max_steps": 2, "batch_size": spec["batch"], "gradient_checkpointing": spec["gc"],
                  "optimizer": spec.get("optim", "auto"), "warmup_ratio": 0.0},
    )


def _build_model(folder: Path, tokenizer_from: Path, **config_fields) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**config_fields, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    # load_base wants a tokenizer in the folder; training feeds token ids, so any will do.
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory, tiny_llama: Path) -> dict[str, Path]:
    """Random Llamas of 8 layers, hidden 512 (~25M 4-bit parameters), by vocabulary."""
    folders = {}
    for name, fields in MODELS.items():
        folders[name] = tmp_path_factory.mktemp(f"llama-{name}")
        _build_model(folders[name], tiny_llama, **LAYERS, **fields)
    return folders


# ---------------------------------------------------------------------------------------------
# Fast: the weight terms equal the bytes bitsandbytes really stores.


def _model_tensor_bytes(model) -> int:
    """Bytes of every distinct storage a model holds: parameters, buffers and 4-bit quant states."""
    import torch

    storages: dict[int, int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for param in model.parameters():
        add(param)
        state = getattr(param, "quant_state", None)
        if state is not None:
            for tensor in (state.absmax, state.code, state.offset):
                add(tensor)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    for buffer in model.buffers():
        add(buffer)
    return sum(storages.values())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("architecture", ["llama-tied", "llama-untied", "gpt2"])
def test_weight_terms_match_loaded_4bit_model(tmp_path, tiny_llama, tiny_gpt2, quant_type, double_quant, architecture):
    import torch

    from qsweep.config.schema import QuantizationConfig
    from qsweep.resources.estimate import estimate_trial_memory
    from qsweep.train.lora import attach_lora
    from qsweep.train.targets import linear_module_names, resolve_target_modules
    from qsweep.train.trial import load_base

    if architecture == "gpt2":  # Conv1D layers, fused qkv
        folder = tiny_gpt2
    else:
        folder = tmp_path / "model"
        _build_model(folder, tiny_llama, vocab_size=512, hidden_size=128, intermediate_size=320,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=architecture == "llama-tied")

    spec = dict(r=8, targets="all-linear", batch=1, seq=16, gc=False, quant=quant_type, dq=double_quant)
    estimate = estimate_trial_memory(_trial_config(spec), folder, "cpu")

    model, _ = load_base(folder, QuantizationConfig(quant_type=quant_type, double_quant=double_quant))
    four_bit = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]
    others = [p for p in model.parameters() if p.__class__.__name__ != "Params4bit"]
    assert four_bit
    assert estimate.quantized_param_count == sum(p.quant_state.shape.numel() for p in four_bit)
    assert estimate.unquantized_param_count == sum(p.numel() for p in others)
    assert (estimate.quantized_weights + estimate.unquantized_weights) * 2**20 == pytest.approx(
        _model_tensor_bytes(model), abs=0.5
    )

    targets = resolve_target_modules("all-linear", linear_module_names(folder))
    lora = attach_lora(model, 8, 16, 0.05, targets, checkpointing=False)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert estimate.lora_param_count == sum(p.numel() for p in trainable)
    assert all(p.dtype == torch.float32 for p in trainable)


def test_estimate_moves_the_right_way(llamas):
    from qsweep.resources.estimate import estimate_trial_memory

    def est(**changes):
        spec = {**CONFIGS[0], **changes}
        return estimate_trial_memory(_trial_config(spec), llamas["v8k"], "cpu")

    base = est()
    assert est(r=64).lora_params == pytest.approx(4 * base.lora_params)
    assert est(targets="attention").lora_params < base.lora_params
    assert est(gc=True).activations < base.activations / 2
    assert est(batch=8).activations == pytest.approx(2 * base.activations, rel=0.05)
    assert est(optim="adamw_8bit").optimizer_state < base.optimizer_state / 3
    assert est(dq=False).quantized_weights > base.quantized_weights
    gpu = estimate_trial_memory(_trial_config(CONFIGS[0]), llamas["v8k"], "cuda")
    assert gpu.runtime_overhead > 300 and gpu.total > gpu.tensors


# ---------------------------------------------------------------------------------------------
# The real thing: estimate vs measured peak of short QLoRA training runs.


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(spec: dict, model_path: Path, out_dir: Path) -> dict:
    """Runs in a fresh process: load in 4 bit, attach LoRA, two Trainer steps, the two peaks."""
    import torch

    torch.set_num_threads(1)
    import datasets
    from torch.profiler import ProfilerActivity, profile
    from transformers import Trainer

    from qsweep.train.lora import attach_lora
    from qsweep.train.targets import linear_module_names, resolve_target_modules
    from qsweep.train.trial import load_base, resolve_compute_dtype, training_arguments

    trial = _trial_config(spec)
    targets = resolve_target_modules(trial.lora.target_modules, linear_module_names(model_path))
    model, _ = load_base(model_path, trial.quantization)
    model = attach_lora(model, trial.lora.r, trial.lora.alpha, trial.lora.dropout, targets,
                        trial.training.gradient_checkpointing)
    model_mib = _model_tensor_bytes(model) / 2**20

    # Rows padded like DataCollatorForSeq2Seq pads to the longest row of a batch: the first row of
    # each batch is full length, the others end in padding, so the attention mask is real.
    batch, seq = spec["batch"], spec["seq"]
    generator = torch.Generator().manual_seed(0)
    vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
    ids = torch.randint(1, vocab, (2 * batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(ids.shape[0]):
        if row % batch:
            mask[row, seq - seq // 8 * (1 + row % 3):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    data = datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )
    args = training_arguments(trial.training, out_dir, resolve_compute_dtype(trial.quantization.compute_dtype),
                              has_eval=False)
    trainer = Trainer(model=model, args=args, train_dataset=data)

    # Weights kept in fp32 can stay mapped from the safetensors file, and their pages only count in
    # RSS once read: read them all now, or the first forward pass would show up as growth.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    rss_before = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train()
        rss_peak = _rss_mib("VmHWM")
    trace = out_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    allocated = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    trace.unlink()
    return {
        "model_tensors_mib": model_mib,
        "allocator_peak_mib": model_mib + allocated / 2**20,
        "rss_peak_mib": model_mib + rss_peak - rss_before,
        "process_rss_before_training_mib": rss_before,
    }


def _run_in_subprocess(spec: dict, model_path: Path, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        # Without a fixed threshold glibc raises it after each large free, later tensors land in the
        # heap and freed memory stays resident: RSS would measure the allocator's history.
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, __file__, json.dumps(spec), str(model_path), str(out_dir)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if result.returncode != 0:
        raise AssertionError(f"measuring {spec['name']} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_estimate_within_15_percent_of_measured_peak(llamas, tmp_path):
    from qsweep.resources.estimate import estimate_trial_memory

    def model_of(spec: dict) -> Path:
        return llamas[spec.get("model", "v8k")]

    # Two processes at a time, one torch thread each: the machine has two cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        measured = list(pool.map(lambda s: _run_in_subprocess(s, model_of(s), tmp_path / s["name"]), CONFIGS))

    rows = []
    for spec, got in zip(CONFIGS, measured):
        est = estimate_trial_memory(_trial_config(spec), model_of(spec), "cpu")
        rows.append({
            "config": spec,
            "estimate": est.model_dump(),
            "estimate_tensors_mib": round(est.tensors, 1),
            **{k: round(v, 1) for k, v in got.items()},
            "ratio_allocator": round(est.tensors / got["allocator_peak_mib"], 3),
            # The measuring process pins glibc's mmap threshold at 128 KiB, where freed tensors leave
            # no heap behind: the estimate's free-heap term (a sweep worker's 4 MiB) does not apply.
            "ratio_rss": round((est.total - est.heap_slack) / got["rss_peak_mib"], 3),
        })
    if os.environ.get("QSWEEP_ESTIMATOR_RESULTS"):
        out = Path(os.environ["QSWEEP_ESTIMATOR_RESULTS"])
        out.parent.mkdir(parents=True, exist_ok=True)
        saved = json.loads(out.read_text()) if out.exists() else {}
        saved.update({"layers": LAYERS, "models": MODELS, "tolerance": TOLERANCE, "rows": rows})
        out.write_text(json.dumps(saved, indent=2) + "\n")

    table = "\n".join(
        f"{r['config']['name']:<26} est {r['estimate_tensors_mib']:>7.1f} alloc {r['allocator_peak_mib']:>7.1f} "
        f"({r['ratio_allocator']:.3f})   est+rt {r['estimate']['total']:>7.1f} rss {r['rss_peak_mib']:>7.1f} "
        f"({r['ratio_rss']:.3f})"
        for r in rows
    )
    print(table)
    for r in rows:
        assert abs(r["ratio_allocator"] - 1) <= TOLERANCE, f"{r['config']['name']} off: \n{table}"
        assert abs(r["ratio_rss"] - 1) <= TOLERANCE, f"{r['config']['name']} off (RSS): \n{table}"


if __name__ == "__main__":
    # The measuring subprocess: SPEC_JSON MODEL_DIR OUT_DIR -> one JSON line on stdout.
    spec_arg, model_arg, out_arg = sys.argv[1:4]
    print(json.dumps(_measure(json.loads(spec_arg), Path(model_arg), Path(out_arg))))
