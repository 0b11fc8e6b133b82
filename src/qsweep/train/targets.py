"""LoRA target-module presets resolved against the actual model's module names.

peft's "all-linear" knows only that one preset and Llama-style names are not universal (GPT-2
calls its layers c_attn/c_proj/c_fc, and c_proj sits in both attention and MLP), so presets are
resolved here by where each linear layer sits, and returned as the shortest suffixes (usually
`parent.leaf`) that match exactly the chosen layers under peft's suffix matching.
"""

from __future__ import annotations

import functools
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


def meta_model(model_path: Path, trust_remote_code: bool = False) -> Any:
    """The model built from config.json on the meta device: every module, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def is_lora_candidate(model: Any, name: str, module: Any) -> bool:
    """A linear layer LoRA may wrap: any Linear or GPT-2 Conv1D except the output head."""
    from transformers.pytorch_utils import Conv1D

    return (isinstance(module, (torch.nn.Linear, Conv1D)) and module is not model.get_output_embeddings()
            and name.split(".")[-1] not in OUTPUT_HEADS)


@functools.lru_cache(maxsize=8)
def _linear_module_names(model_path: Path, trust_remote_code: bool) -> tuple[str, ...]:
    def read() -> list[str]:
        model = meta_model(model_path, trust_remote_code)
        return [name for name, module in model.named_modules() if is_lora_candidate(model, name, module)]

    return tuple(structure.read_once("linear-names", model_path, trust_remote_code, read))


def linear_module_names(model_path: Path, trust_remote_code: bool = False) -> list[str]:
    """Full names of every linear layer LoRA may target, read from the config (no weights)."""
    return list(_linear_module_names(Path(model_path), trust_remote_code))


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


def resolve_target_modules(spec: str | list[str], linear_names: list[str]) -> list[str]:
    """Preset name, comma-separated names, or a list of names → sorted suffixes peft will match."""
    if isinstance(spec, str) and spec in PRESETS:
        resolved = preset_suffixes(linear_names, spec)
        if not resolved:
            raise TargetModuleError(f"preset {spec!r} matches no linear layer in this model")
        return resolved
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [t for t in names if not any(_matches(n, t) for n in linear_names)]
    if unknown:
        valid = sorted({n.split(".")[-1] for n in linear_names} | {".".join(n.split(".")[-2:]) for n in linear_names})
        raise TargetModuleError(
            f"{', '.join(map(repr, unknown))} not in this model; use a preset ({', '.join(PRESETS)}) "
            f"or one of: {', '.join(valid)}"
        )
    return _unambiguous_suffixes([n for n in linear_names if any(_matches(n, t) for t in names)], linear_names)
