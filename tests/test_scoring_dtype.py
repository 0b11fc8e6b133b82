"""Every model is scored in the compute dtype (config.policy.scoring_dtype): the untuned base and the
trained adapters alike, hold the same precision, and bf16 scores agree with fp32 ones within stderr."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qsweep.config.schema import EvaluationConfig, QuantizationConfig, SweepConfig
from qsweep.evaluate.harness import evaluate_model, include_dirs, score
from qsweep.train.lora import attach_lora
from qsweep.train.trial import load_base

REPO = Path(__file__).resolve().parent.parent


def head_dtypes_while_scoring(model, tokenizer, quant: QuantizationConfig) -> tuple[set[torch.dtype], str]:
    """The dtypes the vocabulary head's matmul produced while lm-eval scored the model."""
    seen: set[torch.dtype] = set()
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    try:
        result = score(model, tokenizer, EvaluationConfig(tasks=["zorble"], limit=2), REPO, quant)
    finally:
        hook.remove()
    return seen, result.dtype


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_scoring_runs_in_the_compute_dtype(tiny_llama: Path, compute_dtype: str):
    quant = QuantizationConfig(compute_dtype=compute_dtype)
    model, tokenizer = load_base(tiny_llama, quant)
    model.eval()
    seen, recorded = head_dtypes_while_scoring(model, tokenizer, quant)
    # The head's weights stay fp32 (load_base); under bf16 its matmul runs in bf16, as the 4-bit layers do.
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert seen == {getattr(torch, compute_dtype)} and recorded == compute_dtype


def unquantized_dtypes(model) -> dict[str, torch.dtype]:
    """The dtype of every parameter bitsandbytes left unquantized (embeddings, norms, head)."""
    from bitsandbytes.nn import Params4bit

    return {name.removeprefix("base_model.model."): p.dtype for name, p in model.named_parameters()
            if not isinstance(p, Params4bit) and "lora_" not in name}


def base_and_trial_precision(model_path: Path, quant: QuantizationConfig) -> tuple[dict, dict]:
    """The untuned base as it is scored, and the same base once a trial has prepared it and attached LoRA."""
    base, _ = load_base(model_path, quant)
    before = unquantized_dtypes(base)
    trial = attach_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"], checkpointing=False)
    return before, unquantized_dtypes(trial)


def test_the_untuned_base_holds_the_precision_the_trials_hold(tiny_llama: Path):
    before, after = base_and_trial_precision(tiny_llama, QuantizationConfig(compute_dtype="bfloat16"))
    assert before and before == after
    assert set(before.values()) == {torch.float32}


@pytest.mark.gpu
def test_on_cuda_the_base_and_the_trials_are_scored_alike(tiny_llama: Path):
    """Issue 19 items 7-8: on CUDA the untuned base kept bf16 for its unquantized layers while the
    trials had them in fp32 (kbit preparation), and both were scored as fp32 matmuls."""
    quant = QuantizationConfig(compute_dtype="bfloat16")
    before, after = base_and_trial_precision(tiny_llama, quant)
    assert before == after and set(before.values()) == {torch.float32}
    model, tokenizer = load_base(tiny_llama, quant)
    assert next(model.parameters()).device.type == "cuda"
    model.eval()
    assert head_dtypes_while_scoring(model, tokenizer, quant) == ({torch.bfloat16}, "bfloat16")


def as_fp32(model) -> None:
    """The whole model computing in fp32: bitsandbytes' 4-bit layers cast their input to their
    compute dtype, so that is set to fp32 too."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = torch.float32


@pytest.mark.slow
def test_bf16_scores_agree_with_fp32_within_their_stderr(tmp_path: Path):
    """A quickstart trial of SmolLM2-135M (4-bit, bf16 compute), trained, then scored as qsweep scores
    it (autocast bf16) and in fp32 throughout, on all 38 zorble items and on MMLU (one seeded question
    per subject, 57)."""
    from qsweep.config.schema import load_sweep
    from qsweep.train.trial import run_trial

    sweep: SweepConfig = load_sweep(REPO / "sweeps" / "quickstart.yaml")
    trial = sweep.trial()
    trial.quantization.compute_dtype = "bfloat16"
    trial.training.max_steps, trial.training.eval_every, trial.training.learning_rate = 20, 20, 3e-3
    trial.evaluation = EvaluationConfig(tasks=["zorble"], limit=2)
    captured = {}

    def keep(model, tokenizer, *args, **kwargs):
        captured.update(model=model, tokenizer=tokenizer)
        return score(model, tokenizer, *args, **kwargs)

    import qsweep.train.trial

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qsweep.train.trial, "score", keep)
        run_trial(trial, sweep.base_dir, tmp_path / "trial", report=lambda _: None)
    model, tokenizer = captured["model"], captured["tokenizer"]
    dirs = include_dirs([], sweep.base_dir)
    cases = {"zorble": {"limit": None}, "mmlu_offline": {"per_subject": 1}}
    results = {}
    for task, items in cases.items():
        bf16 = score(model, tokenizer, EvaluationConfig(tasks=[task], **items), sweep.base_dir, trial.quantization)
        assert bf16.dtype == "bfloat16"
        results[task] = bf16
    as_fp32(model)
    for task, items in cases.items():
        fp32 = evaluate_model(model, tokenizer, [task], dirs, dtype="float32", **items)
        bf16 = results[task]
        # Accuracy and its standard error from the items themselves: lm-eval gives a group of
        # one-question subtasks (the MMLU guard) no stderr, and its accuracy is the items' mean.
        (acc_16, err_16), (acc_32, err_32) = mean_and_stderr(bf16.samples), mean_and_stderr(fp32.samples)
        assert acc_32 == pytest.approx(fp32.scores[f"{task}/acc"]) and acc_16 == pytest.approx(bf16.scores[f"{task}/acc"])
        assert abs(acc_16 - acc_32) <= max(err_16, err_32), (task, acc_16, acc_32, err_16)
        same = [a["acc"] == b["acc"] for t, v in fp32.samples.items()
                for a, b in zip(sorted(v, key=by_doc), sorted(bf16.samples[t], key=by_doc))]
        assert len(same) in (38, 57) and sum(same) / len(same) >= 0.9, (task, sum(same), len(same))
    assert results["zorble"].scores["zorble/acc"] > 0.25  # trained: the comparison is not between two chance scores


def by_doc(sample: dict) -> int:
    return sample["doc_id"]


def mean_and_stderr(samples: dict[str, list[dict]]) -> tuple[float, float]:
    outcomes = [s["acc"] for items in samples.values() for s in items]
    mean = sum(outcomes) / len(outcomes)
    return mean, math.sqrt(mean * (1 - mean) / (len(outcomes) - 1))
