"""LoRA variants and training options as trial fields, each checked against the library that runs it:
DoRA, rsLoRA, lora.bias and layers_to_transform against the adapter peft builds on a 4-bit base,
LoRA+ against peft's optimizer and the Trainer's own optimizer choice, NEFTune against the noise
the Trainer adds, num_epochs against the Trainer's own step count, and the refusals of validate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from qsweep.cli import app
from qsweep.config.schema import DEFAULT_MAX_STEPS, TrainingConfig, TrialConfig


def _trial(**sections) -> TrialConfig:
    return TrialConfig(data={"train": "unused.jsonl"}, **sections)


# --- the fields ------------------------------------------------------------------------------------


@pytest.mark.parametrize("given, layers", [("0-2,5", [0, 1, 2, 5]), (3, [3]), ([2, 0, 2], [0, 2]), ("7", [7]),
                                           (None, None)])
def test_layers_to_transform_takes_lists_ranges_and_one_layer(given, layers):
    assert _trial(lora={"layers_to_transform": given}).lora.layers_to_transform == layers


@pytest.mark.parametrize("given", ["a-b", [], [-1], True, "3-"])
def test_layers_to_transform_refuses_what_is_not_layers(given):
    with pytest.raises(ValidationError, match="layers_to_transform"):
        _trial(lora={"layers_to_transform": given})


def test_a_trial_trains_for_steps_or_for_epochs():
    assert TrainingConfig().max_steps == DEFAULT_MAX_STEPS
    epochs = TrainingConfig(num_epochs=2)
    assert (epochs.max_steps, epochs.num_epochs) == (None, 2)
    with pytest.raises(ValidationError, match="training.max_steps and training.num_epochs are both set; keep one"):
        TrainingConfig(max_steps=10, num_epochs=1)


@pytest.mark.parametrize("rows, batch, accumulation, epochs", [
    (93, 4, 1, 0.1), (10, 4, 1, 2), (10, 3, 2, 1.5), (5, 8, 4, 3), (100, 7, 3, 0.25), (1, 1, 1, 1),
])
def test_total_steps_of_epochs_is_the_trainers_own_count(tmp_path, rows, batch, accumulation, epochs):
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments

    training = TrainingConfig(num_epochs=epochs, batch_size=batch, gradient_accumulation_steps=accumulation)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, use_cpu=True, report_to="none",
                             remove_unused_columns=False)
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args,
                      train_dataset=datasets.Dataset.from_dict({"x": list(range(rows))}))
    *_, trainers_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())
    assert training.total_steps(rows) == trainers_steps


def test_training_arguments_carry_epochs_warmup_and_neftune(tmp_path):
    import torch

    from qsweep.train.trial import training_arguments

    training = TrainingConfig(num_epochs=2, batch_size=4, warmup_ratio=0.1, neftune_noise_alpha=5)
    args = training_arguments(training, tmp_path, torch.float32, has_eval=False, train_rows=93)
    assert (args.max_steps, args.num_train_epochs, args.neftune_noise_alpha) == (-1, 2, 5)
    assert args.warmup_steps == math.ceil(0.1 * 48)
    steps = training_arguments(TrainingConfig(max_steps=30), tmp_path, torch.float32, has_eval=False)
    assert (steps.max_steps, steps.warmup_steps, steps.neftune_noise_alpha) == (30, 2, None)


# --- the adapter peft builds on the 4-bit base ---------------------------------------------------------


def _adapter(model_path: Path, **lora):
    from qsweep.config.schema import QuantizationConfig
    from qsweep.train.lora import attach_trial_lora, trial_targets
    from qsweep.train.trial import load_base

    trial = _trial(lora={"r": 4, "alpha": 8, **lora})
    model, _ = load_base(model_path, QuantizationConfig())
    return trial, attach_trial_lora(model, trial.lora, trial_targets(trial.lora, model_path), checkpointing=False)


def _lora_layers(peft_model) -> dict[str, object]:
    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "base_layer")}


def _trainable(peft_model) -> dict[str, int]:
    return {name: p.numel() for name, p in peft_model.named_parameters() if p.requires_grad}


def _estimate(trial: TrialConfig, model_path: Path):
    from qsweep.resources.estimate import estimate_trial_memory

    return estimate_trial_memory(trial, model_path, "cpu")


def test_dora_and_rslora_are_peft_s_own_on_every_4bit_layer(tiny_llama):
    trial, model = _adapter(tiny_llama, use_dora=True, use_rslora=True)
    layers = _lora_layers(model)
    assert len(layers) == 14
    for layer in layers.values():
        assert type(layer.base_layer).__name__ == "Linear4bit"
        assert layer.lora_magnitude_vector["default"].weight.shape == (layer.out_features,)
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert _estimate(trial, tiny_llama).lora_param_count == sum(_trainable(model).values())


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_lora_bias_trains_the_biases_peft_unfreezes_and_the_estimate_counts_them(tiny_gpt2, bias):
    trial, model = _adapter(tiny_gpt2, bias=bias, target_modules="attention")
    trainable = _trainable(model)
    biases = {name: n for name, n in trainable.items() if name.endswith(".bias")}
    assert biases
    if bias == "lora_only":
        wrapped = _lora_layers(model)
        assert {name.removeprefix("base_model.model.").rsplit(".", 2)[0] for name in biases} <= set(wrapped)
        assert not any(".mlp." in name or "ln_" in name for name in biases)
    else:
        assert any("ln_" in name for name in biases) and any(".mlp." in name for name in biases)
    estimate = _estimate(trial, tiny_gpt2)
    assert estimate.lora_param_count == sum(n for name, n in trainable.items() if "lora_" in name)
    assert estimate.lora_grads * 2**20 == pytest.approx(4 * sum(trainable.values()))


def test_layers_to_transform_wraps_only_those_layers(tiny_llama):
    trial, model = _adapter(tiny_llama, layers_to_transform=[1])
    layers = set(_lora_layers(model))
    assert layers == {f"model.layers.1.{block}" for block in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert _estimate(trial, tiny_llama).lora_param_count == sum(_trainable(model).values())


# --- LoRA+ and NEFTune through the Trainer --------------------------------------------------------------


def _tiny_peft(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    from qsweep.train.lora import attach_lora

    return attach_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), 4, 8, 0.0,
                       ["self_attn.q_proj", "self_attn.v_proj"], False)


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit",
                                       "adamw_8bit"])
def test_loraplus_wraps_every_optimizer_a_sweep_can_name(tiny_llama, tmp_path, optimizer):
    """Every optimizer the schema allows is a class the Trainer builds from param groups, so LoRA+
    (peft's create_loraplus_optimizer) can wrap each: lora_B at ratio x the learning rate."""
    import torch
    from transformers import Trainer

    from qsweep.config.schema import TrainingConfig as Training
    from qsweep.train.lora import trainer_optimizers
    from qsweep.train.trial import training_arguments

    assert optimizer in Training.model_fields["optimizer"].annotation.__args__
    model = _tiny_peft(tiny_llama)
    args = training_arguments(Training(optimizer=optimizer, learning_rate=1e-4, weight_decay=0.01), tmp_path,
                              torch.float32, has_eval=False)
    built, scheduler = trainer_optimizers(model, args, 16)
    assert scheduler is None
    assert type(built) is Trainer.get_optimizer_cls_and_kwargs(args, model)[0]
    groups = {id(p): group for group in built.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert groups[id(param)]["lr"] == pytest.approx(1.6e-3 if "lora_B" in name else 1e-4), name
            assert groups[id(param)]["weight_decay"] == 0.01
    assert trainer_optimizers(model, args, None) == (None, None)


def _train(model, tokenizer_from: Path, tmp_path: Path, training: TrainingConfig, callback=None):
    import datasets
    import torch
    from transformers import Trainer

    from qsweep.train.lora import trainer_optimizers
    from qsweep.train.trial import training_arguments

    ids = torch.randint(1, 400, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 8, "labels": ids})
    args = training_arguments(training, tmp_path, torch.float32, has_eval=False, train_rows=len(data))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback] if callback else None,
                      optimizers=trainer_optimizers(model, args, training.loraplus_lr_ratio))
    trainer.train()
    return trainer


def test_loraplus_is_the_optimizer_the_trainer_steps_with_its_own_schedule(tiny_llama, tmp_path):
    model = _tiny_peft(tiny_llama)
    trainer = _train(model, tiny_llama, tmp_path, TrainingConfig(max_steps=2, batch_size=4, loraplus_lr_ratio=8,
                                                                 lr_scheduler="constant", warmup_ratio=0))
    rates = {group["lr"] for group in trainer.optimizer.param_groups if group["params"]}
    assert rates == {2e-4, 8 * 2e-4}
    assert trainer.lr_scheduler is not None and trainer.state.global_step == 2


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_neftune_noises_the_input_embeddings_only_while_training(tiny_llama, tmp_path, alpha):
    import torch
    from transformers import TrainerCallback

    model = _tiny_peft(tiny_llama)
    seen: list[bool] = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # the model in training mode, NEFTune's hook on
            embeddings, ids = model.get_input_embeddings(), torch.tensor([[5, 6, 7]])
            with torch.no_grad():
                seen.append(not torch.equal(embeddings(ids), embeddings(ids)))

    _train(model, tiny_llama, tmp_path, TrainingConfig(max_steps=1, batch_size=4, neftune_noise_alpha=alpha), Probe())
    assert seen == [alpha is not None]


def test_num_epochs_trains_the_steps_the_driver_counts(tiny_llama, tmp_path):
    model = _tiny_peft(tiny_llama)
    training = TrainingConfig(num_epochs=1.5, batch_size=3)
    trainer = _train(model, tiny_llama, tmp_path, training)
    assert trainer.state.global_step == training.total_steps(8) == 5


# --- validate's refusals -------------------------------------------------------------------------------


def _validate(sweep: dict, folder: Path, space: dict | None = None) -> tuple[int, str]:
    if space is not None:
        (folder / "space.yaml").write_text(yaml.safe_dump({"params": space}, sort_keys=False))
        sweep["search"]["space"] = str(folder / "space.yaml")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, " ".join(result.output.split())


def test_validate_refuses_layers_the_model_lacks(tiny_sweep_dict, tmp_path):
    tiny_sweep_dict["lora"] = {"layers_to_transform": "1-3"}
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 2
    assert ("lora.layers_to_transform = [1, 2, 3]: this model has 2 decoder layers (0 to 1), so [2, 3] do not exist; "
            "name layers below 2") in output


def test_validate_refuses_steps_and_epochs_together(tiny_sweep_dict, tmp_path):
    tiny_sweep_dict["training"]["num_epochs"] = 2
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 2 and "training.max_steps and training.num_epochs are both set; keep one" in output

    del tiny_sweep_dict["training"]["num_epochs"]
    code, output = _validate(tiny_sweep_dict, tmp_path, {"training.num_epochs": {"choices": [1, 2]}})
    assert code == 2
    assert ("search.space params.training.num_epochs: the sweep file sets training.max_steps (10), and a trial "
            "trains for steps or for epochs, not both") in output

    code, output = _validate(tiny_sweep_dict, tmp_path, {"training.num_epochs": {"choices": [1, 2]},
                                                        "training.max_steps": {"choices": [10, 20]}})
    assert code == 2 and "searches both training.max_steps and training.num_epochs" in output

    del tiny_sweep_dict["training"]["max_steps"]
    code, output = _validate(tiny_sweep_dict, tmp_path, {"training.num_epochs": {"choices": [1, 2]}})
    assert code == 0, output


def test_a_sweep_of_epochs_validates_asha_against_its_steps(tiny_sweep_dict, tmp_path):
    """93 training rows in batches of 4 are 24 steps an epoch: a grace of 30 steps is past 0.5 epochs."""
    tiny_sweep_dict["training"] = {"num_epochs": 0.5, "batch_size": 4, "eval_every": 5}
    tiny_sweep_dict["search"]["asha"] = {"grace_steps": 30}
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 2
    assert ("search.asha.grace_steps: 30 is above the 12 steps of training.num_epochs = 0.5 over 93 rows" in output)
