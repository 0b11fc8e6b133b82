"""Tiny random models of the architectures people tune, built from transformers' own config classes.

Each is 2 decoder layers of hidden 64 with a 512-token vocabulary, saved with save_pretrained beside
the tiny Llama's in-process tokenizer: a folder qsweep takes as `model.name`. The table also names
where each architecture keeps its decoder layers and, inside a layer, its attention and MLP blocks:
the tests read the expected LoRA targets from those modules of the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
              max_position_embeddings=1024)


@dataclass(frozen=True)
class Architecture:
    config_class: str  # in transformers
    fields: dict[str, Any] = field(default_factory=dict)  # over COMMON; None drops a common field
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    router: str | None = None  # the MoE block's routing module(s), never a LoRA target

    def config(self) -> Any:
        import transformers

        values = {k: v for k, v in {**COMMON, **self.fields}.items() if v is not None}
        return getattr(transformers, self.config_class)(**values)


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
ARCHITECTURES: dict[str, Architecture] = {
    "qwen2": Architecture("Qwen2Config"),
    "qwen3": Architecture("Qwen3Config"),
    "gemma2": Architecture("Gemma2Config"),
    "gemma3": Architecture("Gemma3TextConfig"),
    "mistral": Architecture("MistralConfig"),
    "phi3": Architecture("Phi3Config"),
    "gpt_neox": Architecture("GPTNeoXConfig", {"num_key_value_heads": None, "head_dim": None},
                             layers="gpt_neox.layers", attention="attention"),
    "olmo2": Architecture("Olmo2Config"),
    "qwen3_moe": Architecture("Qwen3MoeConfig", MOE, router="gate"),
    # A Linear router and shared-expert gate beside fused experts and a shared expert's Linear MLP.
    "qwen2_moe": Architecture("Qwen2MoeConfig", {**MOE, "shared_expert_intermediate_size": 64},
                              router="gate,shared_expert_gate"),
}
MOE_ARCHITECTURES = [name for name, arch in ARCHITECTURES.items() if arch.router]


def build_architecture(name: str, folder: Path, tokenizer_from: Path) -> Path:
    """Random weights (seeded) + config + tokenizer in `folder`, as save_pretrained writes them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(ARCHITECTURES[name].config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder
