"""Readable MLflow run names and descriptions for a sweep's trials.

MLflow's UI lists runs by name; a Ray trial id (`726caa86`) says nothing about what the trial
tried, so the name carries the sweep, the trial's number and its key params, and the run's
description (`mlflow.note.content`) carries a one-line summary of its whole config.
"""

from __future__ import annotations

from typing import Any


def short_float(value: float) -> str:
    """0.0003 → `3e-4`, 0.00025 → `2.5e-4`: learning rates as people write them."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def trial_number(experiment_tag: str) -> int | None:
    """Ray's searcher tags trials `N_key=value,...`, N counting from 1 in the order they were
    suggested; the tag is saved with the trial, so the number survives a resume."""
    head = experiment_tag.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _targets(trial: dict[str, Any]) -> str:
    targets = trial["lora"]["target_modules"]
    return targets if isinstance(targets, str) else ",".join(targets)


def trial_run_name(sweep_name: str, number: int | None, trial: dict[str, Any]) -> str:
    """`quickstart #3 nf4 r16 lr3e-4 all-linear` from a resolved trial config (model_dump)."""
    label = f"{sweep_name} #{number}" if number is not None else sweep_name
    return (f"{label} {trial['quantization']['quant_type']} r{trial['lora']['r']} "
            f"lr{short_float(trial['training']['learning_rate'])} {_targets(trial)}")


def trial_summary(trial: dict[str, Any]) -> str:
    """The whole config on one line, for the run's description."""
    quant, lora, training = trial["quantization"], trial["lora"], trial["training"]
    length = (f"{training['max_steps']} steps" if training["max_steps"] is not None
              else f"{training['num_epochs']:g} epochs")
    double = " + double quant" if quant["double_quant"] else ""
    return (f"{trial['model']['name']} in {quant['quant_type']}{double} ({quant['compute_dtype']} compute) · "
            f"LoRA r {lora['r']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:.3g} on {_targets(trial)} · "
            f"lr {short_float(training['learning_rate'])} {training['lr_scheduler']}, "
            f"warmup {training['warmup_ratio']:g} · {length} × batch {training['batch_size']}"
            f" × accumulation {training['gradient_accumulation_steps']} · seed {training['seed']}")
