"""LoRA target-module presets resolved against the actual model's module names.

peft's "all-linear" knows only that one preset and Llama-style names are not universal (GPT-2
calls its layers c_attn/c_proj/c_fc, and c_proj sits in both attention and MLP), so presets are
resolved here by where each linear layer sits, and returned as `parent.leaf` suffixes that peft
matches unambiguously.
"""

from __future__ import annotations

from pathlib import Path

import torch

PRESETS = ("attention", "mlp", "all-linear")
ATTENTION_PARENTS = ("attn", "attention")
MLP_PARENTS = ("mlp", "feed_forward", "ffn", "ffw")
OUTPUT_HEADS = ("lm_head", "embed_out", "output")


class TargetModuleError(ValueError):
    pass


def linear_module_names(model_path: Path, trust_remote_code: bool = False) -> list[str]:
    """Full names of every linear layer, read from the config on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name.split(".")[-1] not in OUTPUT_HEADS
    ]


def _suffix(name: str) -> str:
    return ".".join(name.split(".")[-2:])


def _in_block(name: str, parents: tuple[str, ...]) -> bool:
    return any(p in part for part in name.lower().split(".")[:-1] for p in parents)


def preset_suffixes(linear_names: list[str], preset: str) -> list[str]:
    if preset == "attention":
        chosen = [n for n in linear_names if _in_block(n, ATTENTION_PARENTS)]
    elif preset == "mlp":
        chosen = [n for n in linear_names if _in_block(n, MLP_PARENTS) and not _in_block(n, ATTENTION_PARENTS)]
    else:
        chosen = list(linear_names)
    return sorted({_suffix(n) for n in chosen})


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
        valid = sorted({n.split(".")[-1] for n in linear_names} | {_suffix(n) for n in linear_names})
        raise TargetModuleError(
            f"{', '.join(map(repr, unknown))} not in this model; use a preset ({', '.join(PRESETS)}) "
            f"or one of: {', '.join(valid)}"
        )
    return sorted({_suffix(n) for n in linear_names if any(_matches(n, t) for t in names)})
