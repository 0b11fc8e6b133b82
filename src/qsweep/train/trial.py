"""One trial: 4-bit base + LoRA, trained with the transformers Trainer, scored with lm-eval.

Nothing here knows about Ray or MLflow: progress goes out through a `report` callable and the
outcome is returned, so the same function runs inside a Ray worker, a test, or `qsweep show`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from qsweep.config.policy import compute_dtype_name, fastest_compute_dtype, optimizer_name
from qsweep.config.schema import QuantizationConfig, TrainingConfig, TrialConfig, dump_yaml
from qsweep.evaluate import cache as evaluation_cache
from qsweep.evaluate import claims
from qsweep.evaluate.harness import CHAT_KEYS, score
from qsweep.resources.caps import cap_process, give_back_memory
from qsweep.resources.estimate import CUDA_CONTEXT_MIB, estimate_trial_memory
from qsweep.train import chat, lengths, quantized
from qsweep.train.data import data_hash, tokenized_sets
from qsweep.train.lora import attach_trial_lora, trainer_optimizers, trial_targets
from qsweep.train.memory import PeakMemory
from qsweep.train.models import content_hash, resolve_model
from qsweep.train.provenance import CONFIG_FILE, write_provenance

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any]], None]


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class TrialTimeout(RuntimeError):
    """The trial ran past limits.time_budget_s."""


def check_budget(started: float, budget: float | None, where: str) -> None:
    elapsed = time.perf_counter() - started
    if budget is not None and elapsed > budget:
        raise TrialTimeout(f"ran {elapsed:.1f} s, over limits.time_budget_s = {budget:g} s ({where})")


@dataclass
class TrialOutcome:
    scores: dict[str, float]
    metrics: dict[str, float]
    provenance: dict[str, Any]
    adapter_dir: Path
    results_file: Path
    samples_file: Path
    curve: list[dict[str, float]] = field(default_factory=list)
    baseline: dict[str, Any] | None = None


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute_dtype(name: str) -> torch.dtype:
    return getattr(torch, compute_dtype_name(name, device_type()))


def resolve_optimizer(name: str) -> str:
    return optimizer_name(name, device_type())


def bnb_config(quant: QuantizationConfig) -> Any:
    from transformers import BitsAndBytesConfig

    dtype = resolve_compute_dtype(quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_base(path: Path, quant: QuantizationConfig, trust_remote_code: bool = False,
              savable: bool = False, chat_template: str | None = None) -> tuple[Any, Any]:
    """The base in 4 bit on this process's device, and its tokenizer (with a pad token and `chat_template`). On a CPU,
    quantized once per machine, then loaded as stored (train.quantized), unless `savable`: transformers
    5 cannot save a model loaded from a 4-bit checkpoint (huggingface/transformers#45743)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = chat.use_template(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The unquantized layers (embeddings, norms, head) are fp32 on every device: kbit preparation makes
    # them fp32 for training anyway, so the untuned base and the adapters hold the same weights in the
    # same precision, and the scoring dtype (config.policy.scoring_dtype) decides how matmuls run.
    on_gpu = torch.cuda.is_available()
    bnb = bnb_config(quant)
    stored = None if on_gpu or trust_remote_code or savable else quantized.stored_folder(
        quantized.quantized_key(content_hash(path), bnb))
    model = quantized.load_stored(stored) if stored else None
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=bnb,
            dtype=torch.float32,
            device_map={"": 0} if on_gpu else {"": "cpu"},
            trust_remote_code=trust_remote_code,
        )
        if stored:
            quantized.store(model, stored)
    keep_cpu_weights_unpacked(model)
    logger.info("loaded the 4-bit base %s (%s, double quant %s)", path.name, quant.quant_type, quant.double_quant)
    return model, tokenizer


def keep_cpu_weights_unpacked(model: Any) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time it
    runs in eval mode. A validation pass in the middle of training then leaves the model scoring
    differently from the same adapter reloaded onto a fresh base (seen with bitsandbytes 0.50), so
    a logged score could not be reproduced. Keeping the plain layout everywhere avoids that."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def training_arguments(training: TrainingConfig, out_dir: Path, compute_dtype: torch.dtype, has_eval: bool,
                       train_rows: int = 0) -> Any:
    """The Trainer's arguments; `train_rows` (the training set's size) is needed with num_epochs."""
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=training.max_steps or -1,
        num_train_epochs=training.num_epochs or 1,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=math.ceil(training.warmup_ratio * training.total_steps(train_rows)),
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        data_seed=training.seed,
        optim=resolve_optimizer(training.optimizer),
        gradient_checkpointing=training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if training.gradient_checkpointing else None,
        bf16=on_gpu and compute_dtype == torch.bfloat16,
        fp16=on_gpu and compute_dtype == torch.float16,
        use_cpu=not on_gpu,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=training.eval_every,
        logging_steps=min(training.eval_every, 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        neftune_noise_alpha=training.neftune_noise_alpha,
    )


def check_loss(loss: float, first: float | None, max_ratio: float | None, step: int) -> None:
    if not math.isfinite(loss):
        raise TrialDiverged(f"training loss became {loss} at step {step}")
    if first is not None and max_ratio is not None and loss > max_ratio * first:
        raise TrialDiverged(
            f"training loss exploded to {loss:.4g} at step {step}, over limits.max_loss_ratio = {max_ratio:g} "
            f"times the first logged loss {first:.4g}"
        )


def _progress_callback(report: Reporter, curve: list[dict[str, float]], started: float, limits: Any) -> Any:
    """Sends each validation loss out (ASHA's signal); stops on a diverged loss or an overrun."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            check_budget(started, limits.time_budget_s, f"at step {state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None:
                first = next((p["train_loss"] for p in curve if "train_loss" in p), None)
                check_loss(loss, first, limits.max_loss_ratio, state.global_step)
                logger.info("step %d: train loss %.4f", state.global_step, loss)
                curve.append({"step": state.global_step, "train_loss": float(loss)})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            eval_loss = float((metrics or {}).get("eval_loss", math.nan))
            if not math.isfinite(eval_loss):
                raise TrialDiverged(f"validation loss became {eval_loss} at step {state.global_step}")
            logger.info("step %d: validation loss %.4f", state.global_step, eval_loss)
            curve.append({"step": state.global_step, "eval_loss": eval_loss})
            # The last step's loss goes out with the final scores: reported alone, it would reach
            # ASHA's max_t and end the trial before it is scored.
            if state.global_step < state.max_steps:
                report({"step": state.global_step, "eval_loss": eval_loss})

    return Progress()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("qsweep", "torch", "transformers", "peft", "bitsandbytes", "lm_eval", "accelerate", "datasets"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


class UntunedBase(NamedTuple):
    """A baseline the sweep still needs: the config its base is loaded and scored with, its
    evaluation cache key and ingredients, and the file through which one trial claims its scoring."""

    config: TrialConfig
    key: str
    ingredients: dict[str, Any]
    claim: Path | None = None


def score_untuned_base(base: UntunedBase, base_dir: Path, model: Any = None, tokenizer: Any = None
                       ) -> dict[str, Any] | None:
    """Scores the untuned base inside a trial and caches the score: with the trial's own base when it
    is quantized the same way (before LoRA touches it), else loaded here and freed before the trial
    loads its own. Either way no other process loads the base, and at most one base is in memory.
    None when the score is cached already, or another trial claimed it (evaluate.claims): of trials
    starting together, one scores the base and the driver reads its score when it lands."""
    if evaluation_cache.load(base.key) is not None:
        return None
    held = claims.claim(base.claim) if base.claim else None
    if base.claim and held is None:
        logger.info("untuned base %s: another trial scores it (claim %s)", base.config.quantization.quant_type,
                    base.claim)
        return None
    started = time.perf_counter()
    try:
        result = score_base(base.config, base_dir, model, tokenizer)
    except BaseException:
        if held:
            held.release()
        raise
    finally:
        if model is None:  # the base loaded for this score: freed before the trial loads its own
            give_back_memory()
    evaluation_cache.store(base.key, base.ingredients, result.scores, result.items)
    return {"key": base.key, "scores": result.scores, "items": result.items, "seconds": time.perf_counter() - started}


def score_base(config: TrialConfig, base_dir: Path, model: Any = None, tokenizer: Any = None) -> Any:
    """lm-eval's result on the untuned base of `config`: `model`, or one loaded here, which is
    unreferenced once this returns (bitsandbytes' 4-bit weights point back at their layers, so only
    a garbage collection frees it: resources.caps.give_back_memory)."""
    if model is None:
        path = resolve_model(config.model.name, config.model.revision, base_dir).path
        model, tokenizer = load_base(path, config.quantization, config.model.trust_remote_code,
                                     chat_template=chat.read_template(config.data.chat_template, base_dir))
    model.eval()
    return score(model, tokenizer, config.evaluation, base_dir, config.quantization)


def run_trial(trial: TrialConfig, base_dir: Path, out_dir: Path, report: Reporter,
              untuned_base: UntunedBase | None = None, context_mb: float = CUDA_CONTEXT_MIB) -> TrialOutcome:
    """Train and score one config; writes adapter/, config.yaml and lm-eval results into out_dir.
    With `untuned_base`, that baseline is scored first (see score_untuned_base). On CUDA the process
    is capped at its Ray share less `context_mb`, the context its request counted."""
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    cap_process(trial.limits.memory_mb, context_mb)
    model_info = resolve_model(trial.model.name, trial.model.revision, base_dir)
    targets = trial_targets(trial.lora, model_info.path, trial.model.trust_remote_code)
    compute_dtype = resolve_compute_dtype(trial.quantization.compute_dtype)
    same_base = untuned_base is not None and untuned_base.config.quantization == trial.quantization
    baseline = score_untuned_base(untuned_base, base_dir) if untuned_base and not same_base else None
    load_started = time.perf_counter()
    model, tokenizer = load_base(model_info.path, trial.quantization, trial.model.trust_remote_code,
                                 chat_template=chat.read_template(trial.data.chat_template, base_dir))
    # Seeded here, right before LoRA's init: quantizing draws random numbers and loading a stored
    # 4-bit base does not, and the untuned base's scoring (lm-eval reseeds) may come before or after.
    # The Trainer seeds again itself (args.seed) before training.
    set_seed(trial.training.seed)
    model = attach_trial_lora(model, trial.lora, targets, trial.training.gradient_checkpointing)

    load_seconds = time.perf_counter() - load_started
    if same_base:
        baseline = score_untuned_base(untuned_base, base_dir, model, tokenizer)
    peak = PeakMemory(model)
    data = trial.data
    train_set, eval_set = tokenized_sets(data, base_dir, tokenizer)
    estimate = estimate_trial_memory(trial, model_info.path, device_type(), lengths.of_sets(train_set, eval_set))
    curve: list[dict[str, float]] = []
    args = training_arguments(trial.training, out_dir, compute_dtype, eval_set is not None, len(train_set))
    trainer = Trainer(
        model=model,
        args=args,
        optimizers=trainer_optimizers(model, args, trial.training.loraplus_lr_ratio),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_progress_callback(report, curve, started, trial.limits)],
    )
    train_started = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - train_started
    memory = peak.measures()

    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    write_provenance(adapter_dir, trial.model.name, model_info.content_hash, trial.quantization)

    check_budget(started, trial.limits.time_budget_s, "after training, before scoring")
    eval_started = time.perf_counter()
    model.eval()
    result = score(model, tokenizer, trial.evaluation, base_dir, trial.quantization)
    eval_seconds = time.perf_counter() - eval_started

    provenance = {
        "model_path": str(model_info.path),
        "model_hash": model_info.content_hash,
        "data_hash": data_hash([data.train, data.validation], base_dir),
        "base_dir": str(base_dir.resolve()),
        "target_modules_resolved": targets.modules,
        **({"target_parameters_resolved": targets.parameters} if targets.parameters else {}),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        **({"compute_dtype_reason": fastest_compute_dtype(device_type())[1]}
           if trial.quantization.compute_dtype == "auto" else {}),
        "optimizer": resolve_optimizer(trial.training.optimizer),
        "scoring_dtype": result.dtype,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": package_versions(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    (out_dir / CONFIG_FILE).write_text(dump_yaml({**trial.model_dump(mode="json"), "provenance": provenance}))
    results_file, samples_file = write_eval_files(result, out_dir)
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "train_loss": float(train_output.training_loss),
        "train_steps": trainer.state.global_step,
        **memory,
        # What the estimate is compared with: on CUDA what torch reserves (the context is outside it).
        "memory_estimate_mb": estimate.tensors if estimate.device == "cuda" else estimate.total,
        "memory_estimate_seq_length": float(estimate.sequence.tokens),
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        "load_seconds": load_seconds,
        "baseline_seconds": baseline["seconds"] if baseline else 0.0,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    metrics["memory_ratio"] = metrics["peak_memory_mb"] / metrics["memory_estimate_mb"]
    return TrialOutcome(result.scores, metrics, provenance, adapter_dir, results_file, samples_file, curve, baseline)


def write_eval_files(result: Any, out_dir: Path) -> tuple[Path, Path]:
    import json

    results_file = out_dir / "lm_eval_results.json"
    kept = {k: result.raw[k] for k in ("results", "configs", "versions", "n-shot", *CHAT_KEYS) if k in result.raw}
    kept["items"] = result.items
    results_file.write_text(json.dumps(kept, indent=2, default=str))
    samples_file = out_dir / "lm_eval_samples.jsonl"
    with open(samples_file, "w") as handle:
        for task, items in result.samples.items():
            for item in items:
                handle.write(json.dumps({"task": task, **item}) + "\n")
    return results_file, samples_file
