"""The adapter of a trial as peft builds it: LoRA and its variants on the resolved targets, and
LoRA+'s optimizer.

Every variant is peft's own (`LoraConfig` fields, `create_loraplus_optimizer`); what is decided here
is only what each trial field means for peft: the expert weights of a mixture-of-experts model go to
`target_parameters`, and LoRA+ gets the optimizer class and settings the Trainer would have built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qsweep.config.schema import LoraConfig
from qsweep.train.targets import Targets, expert_parameter_names, linear_module_names, resolve_targets


def trial_targets(lora: LoraConfig, model_path: Path, trust_remote_code: bool = False) -> Targets:
    """lora.target_modules resolved against the model, its expert weights and lora.layers_to_transform."""
    return resolve_targets(lora.target_modules, linear_module_names(model_path, trust_remote_code),
                           expert_parameter_names(model_path, trust_remote_code), lora.layers_to_transform)


def attach_lora(model: Any, r: int, alpha: float, dropout: float, targets: list[str], checkpointing: bool, *,
                parameters: list[str] = (), use_dora: bool = False, use_rslora: bool = False, bias: str = "none",
                layers_to_transform: list[int] | None = None) -> Any:
    """`model` prepared for k-bit training with LoRA on `targets` (Linear suffixes) and `parameters`
    (full names of fused expert weights)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    lora = PeftLoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, target_parameters=list(parameters) or None,
        use_dora=use_dora, use_rslora=use_rslora, bias=bias, layers_to_transform=layers_to_transform,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def attach_trial_lora(model: Any, lora: LoraConfig, targets: Targets, checkpointing: bool) -> Any:
    return attach_lora(model, lora.r, lora.alpha, lora.dropout, targets.modules, checkpointing,
                       parameters=targets.parameters, use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                       bias=lora.bias, layers_to_transform=lora.layers_to_transform)


def loraplus_optimizer(model: Any, args: Any, ratio: float) -> Any:
    """LoRA+ (peft's create_loraplus_optimizer): lora_B (and 1-D trainables: DoRA magnitudes, biases)
    at `ratio` x the learning rate, with the optimizer class and settings (betas, eps, fused, 8-bit,
    paged) the Trainer builds for `args.optim`, and the trial's weight decay."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    learning_rate = kwargs.pop("lr")
    return create_loraplus_optimizer(model, optimizer_cls, lr=learning_rate, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)


def trainer_optimizers(model: Any, args: Any, loraplus_lr_ratio: float | None) -> tuple[Any, Any]:
    """The Trainer's `optimizers` argument: LoRA+'s optimizer with the Trainer's own schedule, or
    (None, None) for the Trainer's own optimizer."""
    return (loraplus_optimizer(model, args, loraplus_lr_ratio) if loraplus_lr_ratio else None), None
