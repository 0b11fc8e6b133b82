"""LoRA target-module presets resolved against the actual model's module names.

peft's "all-linear" knows only that one preset and Llama-style names are not universal (GPT-2
calls its layers c_attn/c_proj/c_fc, and c_proj sits in both attention and MLP), so presets are
resolved here by where each linear layer sits, and returned as the shortest suffixes (usually
`parent.leaf`) that match exactly the chosen layers under peft's suffix matching.

A mixture-of-experts model in transformers 5 keeps its experts as fused 3-D parameters
(`mlp.experts.gate_up_proj` [experts, out, in]), not Linear layers: peft reaches them with
`target_parameters`, so `mlp` and `all-linear` name them there. Its router (`mlp.gate`, a Linear in
some models) is never a target: training it changes which experts see which tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qsweep.train import structure

PRESETS = ("attention", "mlp", "all-linear")
ATTENTION_PARENTS = ("attn", "attention")
MLP_PARENTS = ("mlp", "feed_forward", "ffn", "ffw")
OUTPUT_HEADS = ("lm_head", "embed_out", "output")


class TargetModuleError(ValueError):
    pass


@dataclass(frozen=True)
class Targets:
    """What peft wraps: Linear layers by name suffix (target_modules) and fused expert weights by
    full name (target_parameters)."""

    modules: list[str]
    parameters: list[str]


def meta_model(model_path: Path, trust_remote_code: bool = False) -> Any:
    """The model built from config.json on the meta device: every module, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def is_router(model: Any, name: str) -> bool:
    """A Linear sitting directly in a mixture-of-experts block (beside its `experts`) routes tokens:
    Qwen2-MoE's `mlp.gate` and `mlp.shared_expert_gate`, Mixtral 4's `block_sparse_moe.gate`."""
    parent, _, _ = name.rpartition(".")
    return hasattr(model.get_submodule(parent), "experts")


def is_lora_candidate(model: Any, name: str, module: Any) -> bool:
    """A linear layer LoRA may wrap: any Linear or GPT-2 Conv1D except the output head and a router."""
    from transformers.pytorch_utils import Conv1D

    return (isinstance(module, (torch.nn.Linear, Conv1D)) and module is not model.get_output_embeddings()
            and name.split(".")[-1] not in OUTPUT_HEADS and not is_router(model, name))


def expert_parameters(model: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(full name, shape) of every fused expert weight: a 3-D parameter of a module named like `experts`."""
    return [(f"{name}.{param_name}", tuple(param.shape))
            for name, module in model.named_modules() if "expert" in name.rpartition(".")[2]
            for param_name, param in module.named_parameters(recurse=False) if param.ndim == 3]


@functools.lru_cache(maxsize=8)
def _linear_module_names(model_path: Path, trust_remote_code: bool) -> tuple[str, ...]:
    def read() -> list[str]:
        model = meta_model(model_path, trust_remote_code)
        return [name for name, module in model.named_modules() if is_lora_candidate(model, name, module)]

    return tuple(structure.read_once("linear-names", model_path, trust_remote_code, read))


def linear_module_names(model_path: Path, trust_remote_code: bool = False) -> list[str]:
    """Full names of every linear layer LoRA may target, read from the config (no weights)."""
    return list(_linear_module_names(Path(model_path), trust_remote_code))


@functools.lru_cache(maxsize=8)
def _expert_parameter_names(model_path: Path, trust_remote_code: bool) -> tuple[str, ...]:
    def read() -> list[str]:
        return [name for name, _ in expert_parameters(meta_model(model_path, trust_remote_code))]

    return tuple(structure.read_once("expert-names", model_path, trust_remote_code, read))


def expert_parameter_names(model_path: Path, trust_remote_code: bool = False) -> list[str]:
    """Full names of the fused expert weights of a mixture-of-experts model (none for a dense one)."""
    return list(_expert_parameter_names(Path(model_path), trust_remote_code))


def in_layers(name: str, layers: list[int]) -> bool:
    """Whether LoRA's `layers_to_transform` keeps the module or parameter `name`: peft's own matcher
    decides, so the layer index is read from the name exactly as peft reads it."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=[name.rpartition(".")[2]], layers_to_transform=layers)
    return bool(check_target_module_exists(config, name))


def _unambiguous_suffixes(chosen: list[str], linear_names: list[str]) -> list[str]:
    """The shortest `parent.leaf`-or-longer suffix of each chosen layer that no other layer ends with."""
    others = [n for n in linear_names if n not in set(chosen)]
    suffixes = set()
    for name in chosen:
        parts = name.split(".")
        for width in range(min(2, len(parts)), len(parts) + 1):
            suffix = ".".join(parts[-width:])
            if not any(_matches(other, suffix) for other in others):
                break
        suffixes.add(suffix)
    return sorted(suffixes)


def _in_block(name: str, parents: tuple[str, ...]) -> bool:
    return any(p in part for part in name.lower().split(".")[:-1] for p in parents)


def preset_suffixes(linear_names: list[str], preset: str) -> list[str]:
    if preset == "attention":
        chosen = [n for n in linear_names if _in_block(n, ATTENTION_PARENTS)]
    elif preset == "mlp":
        chosen = [n for n in linear_names if _in_block(n, MLP_PARENTS) and not _in_block(n, ATTENTION_PARENTS)]
    else:
        chosen = list(linear_names)
    return _unambiguous_suffixes(chosen, linear_names)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _valid_names(names: list[str]) -> list[str]:
    return sorted({n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names})


def resolve_target_modules(spec: str | list[str], linear_names: list[str]) -> list[str]:
    """Preset name, comma-separated names, or a list of names → sorted suffixes peft will match."""
    return resolve_targets(spec, linear_names).modules


def resolve_targets(spec: str | list[str], linear_names: list[str], expert_names: list[str] = (),
                    layers: list[int] | None = None) -> Targets:
    """lora.target_modules against the model: Linear suffixes for peft's target_modules and, on a
    mixture-of-experts model, the expert weights (in `layers` only, when given) for target_parameters."""
    if isinstance(spec, str) and spec in PRESETS:
        modules = preset_suffixes(linear_names, spec)
        parameters = [] if spec == "attention" else list(expert_names)
        if not modules and not parameters:
            raise TargetModuleError(f"preset {spec!r} matches no linear layer in this model")
    else:
        names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        unknown = [t for t in names if not any(_matches(n, t) for n in [*linear_names, *expert_names])]
        if unknown:
            raise TargetModuleError(
                f"{', '.join(map(repr, unknown))} not in this model; use a preset ({', '.join(PRESETS)}) "
                f"or one of: {', '.join(_valid_names([*linear_names, *expert_names]))}"
            )
        chosen = [n for n in linear_names if any(_matches(n, t) for t in names)]
        modules = _unambiguous_suffixes(chosen, linear_names) if chosen else []
        parameters = [e for e in expert_names if any(_matches(e, t) for t in names)]
    # peft applies layers_to_transform to target_modules but not to target_parameters: name those layers' own.
    return Targets(modules, [p for p in parameters if layers is None or in_layers(p, layers)])
