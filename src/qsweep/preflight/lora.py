"""LoRA variants and training options that cannot run together, refused before training.

Each rule is one peft or transformers refusal (or a silent no-op) said in the sweep's own terms: the
fields, their values, why, and what to set instead. The base trial is checked, and so is every
combination of the extreme values the search space gives these fields, since a sampled trial can
pair any of them.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qsweep.config.schema import SweepConfig, TrialConfig
from qsweep.search.space import SearchSpace, apply_params
from qsweep.train.targets import TargetModuleError, Targets, in_layers, linear_module_names, resolve_targets

# The trial fields whose combinations these rules judge.
FIELDS = ("lora.target_modules", "lora.dropout", "lora.use_dora", "lora.layers_to_transform")
STEP_FIELDS = ("training.max_steps", "training.num_epochs")


def _experts_rules(trial: TrialConfig, targets: Targets) -> list[str]:
    """peft trains fused expert weights through target_parameters (lora.ParamWrapper), which refuses
    dropout and DoRA."""
    if not targets.parameters:
        return []
    lora, problems = trial.lora, []
    reach = (f"lora.target_modules = {lora.target_modules!r} reaches this mixture-of-experts model's experts, "
             f"fused weights such as {targets.parameters[0]} that peft trains through target_parameters")
    if lora.dropout > 0:
        problems.append(f"lora.dropout = {lora.dropout:g} with {reach}, which cannot drop out an expert's input "
                        "(peft refuses it); set lora.dropout: 0, or lora.target_modules: attention")
    if lora.use_dora:
        problems.append(f"lora.use_dora = true with {reach}, to which peft cannot apply DoRA; set lora.use_dora: "
                        "false, or lora.target_modules: attention")
    return problems


def _layers_rules(trial: TrialConfig, targets: Targets, linear_names: list[str], layer_count: int) -> list[str]:
    layers = trial.lora.layers_to_transform
    if layers is None:
        return []
    if missing := [i for i in layers if i >= layer_count]:
        return [f"lora.layers_to_transform = {layers}: this model has {layer_count} decoder layers (0 to "
                f"{layer_count - 1}), so {missing} do not exist; name layers below {layer_count}"]
    wrapped = [n for n in linear_names if any(n == t or n.endswith("." + t) for t in targets.modules)]
    if not targets.parameters and not any(in_layers(n, layers) for n in wrapped):
        return [f"lora.layers_to_transform = {layers} with lora.target_modules = {trial.lora.target_modules!r}: "
                "peft finds none of the targeted layers in those layers (it reads the layer index from names "
                "such as model.layers.3.self_attn.q_proj); target other modules or drop layers_to_transform"]
    return []


def trial_problems(trial: TrialConfig, linear_names: list[str], expert_names: list[str],
                   layer_count: int) -> list[str]:
    """Why this trial's LoRA cannot run on the model (an empty list when it can). Unknown targets are
    preflight.model's to report."""
    lora = trial.lora
    try:
        targets = resolve_targets(lora.target_modules, linear_names, expert_names, lora.layers_to_transform)
    except TargetModuleError:
        return []
    return _experts_rules(trial, targets) + _layers_rules(trial, targets, linear_names, layer_count)


def _combinations(sweep: SweepConfig, space: SearchSpace | None) -> list[tuple[str, TrialConfig]]:
    """(where, trial): the base trial, then each combination of the space's extreme values of FIELDS."""
    found = [("", sweep.trial())]
    searched = {name: space.params[name].edge_values() for name in FIELDS if space and name in space.params}
    for values in itertools.product(*searched.values()):
        try:
            found.append(("search.space: ", apply_params(sweep.trial(), dict(zip(searched, values)))))
        except ValidationError:
            continue  # search.space's own checks report a value no trial accepts
    return found


def check_lora(sweep: SweepConfig, space: SearchSpace | None, folder: Path) -> list[str]:
    from qsweep.resources.estimate import model_shape
    from qsweep.train.targets import expert_parameter_names

    trust = sweep.model.trust_remote_code
    try:
        linear_names = linear_module_names(folder, trust)
        expert_names = expert_parameter_names(folder, trust)
        layer_count = model_shape(Path(folder).resolve(), trust).layers
    except Exception:  # noqa: BLE001 - preflight.model reports a config the model classes reject
        return []
    problems: list[str] = []
    for where, trial in _combinations(sweep, space):
        for problem in trial_problems(trial, linear_names, expert_names, layer_count):
            if f"{where}{problem}" not in problems and problem not in problems:
                problems.append(f"{where}{problem}")
    return problems


def check_steps(sweep: SweepConfig, space: SearchSpace | None) -> list[str]:
    """A trial trains for steps or for epochs: the space may search one of them only where the sweep
    file does not set the other (a searched value would silently replace it)."""
    searched = [name for name in STEP_FIELDS if space and name in space.params]
    if len(searched) == 2:
        return ["search.space searches both training.max_steps and training.num_epochs; a trial trains for one "
                "of them, so search one"]
    set_in_file: Any = sweep.training.model_fields_set
    problems = []
    for name in searched:
        other = next(f for f in STEP_FIELDS if f != name)
        if other.split(".")[1] in set_in_file:
            problems.append(f"search.space params.{name}: the sweep file sets {other} "
                            f"({getattr(sweep.training, other.split('.')[1])}), and a trial trains for steps or "
                            f"for epochs, not both; remove {other} from the sweep file, or search it instead")
    return problems
