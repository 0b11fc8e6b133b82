"""Memory of what LoRA variants and mixture-of-experts models add to a trial (resources.estimate
uses these terms; each says what peft or transformers keeps, and where it was measured).

The model's shape is the estimate's ModelShape, passed in (this module does not import the estimate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from qsweep.config.policy import Device
from qsweep.config.schema import LoraConfig, TrainingConfig
from qsweep.train.targets import in_layers, resolve_targets


@dataclass(frozen=True)
class ExpertWeight:
    """One fused expert weight of a mixture-of-experts layer: [count, out, in] (transformers 5)."""

    name: str
    count: int
    out_features: int
    in_features: int


@dataclass(frozen=True)
class Trainables:
    """What a trial's LoRA wraps and trains."""

    wrapped: list[Any]  # linear layers with LoRA
    experts: list[Any]  # fused expert weights with LoRA
    tensors: list[int]  # elements of each LoRA tensor (A, B, DoRA's magnitudes)
    biases: list[int]  # elements of each bias lora.bias trains (already counted as weights)


def variant_fields(model: Any) -> dict[str, Any]:
    """The shape's fields these terms read, from the model built on the meta device: its fused expert
    weights, experts per token, and every bias (what lora.bias may train)."""
    from qsweep.train.targets import expert_parameters

    experts = tuple(ExpertWeight(name, *dims) for name, dims in expert_parameters(model))
    biases = tuple((name, p.numel()) for name, p in model.named_parameters() if name.rpartition(".")[2] == "bias")
    per_token = getattr(model.config, "num_experts_per_tok", 0) if experts else 0
    return {"experts": experts, "experts_per_token": per_token, "biases": biases,
            "attention_maps": attention_maps(model.config)}


def attention_maps(config: Any) -> int:
    """The [seq x seq] maps per head that transformers' eager attention (eager_attention_forward)
    keeps for the backward, where a model runs it instead of SDPA (Gemma 2, whose logit soft-capping
    SDPA cannot do): the softmax's output, and with soft-capping the tanh's output. Measured on a
    Gemma 2 layer: two [batch x heads x seq x seq] fp32 tensors."""
    if getattr(config, "_attn_implementation", None) != "eager":
        return 0
    return 1 + (getattr(config, "attn_logit_softcapping", None) is not None)


def eager_attention_bytes(shape: Any, seq: int, cast: int) -> int:
    """Per token and layer, the eager attention maps (fp32 softmax, and its copy in the compute dtype
    under autocast)."""
    if not shape.attention_maps:
        return 0
    return shape.heads * seq * (4 * shape.attention_maps + (cast if cast < 4 else 0))


def lora_trainables(shape: Any, lora: LoraConfig) -> Trainables:
    """From the model's shape (`linears`, `experts`, `biases`), through the same target resolution
    the trial uses. LoRA weights are fp32 (peft upcasts adapters): A is r x in and B out x r; on
    fused experts A is (r x experts) x in and B out x (r x experts); DoRA adds a magnitude per row."""
    targets = resolve_targets(lora.target_modules, [q.name for q in shape.linears], [e.name for e in shape.experts],
                              lora.layers_to_transform)
    wrapped = [q for q in shape.linears if any(q.name == t or q.name.endswith("." + t) for t in targets.modules)
               and (lora.layers_to_transform is None or in_layers(q.name, lora.layers_to_transform))]
    experts = [e for e in shape.experts if e.name in targets.parameters]
    tensors = [n for q in wrapped for n in (lora.r * q.in_features, lora.r * q.out_features)]
    tensors += [n for e in experts for n in (lora.r * e.count * e.in_features, lora.r * e.count * e.out_features)]
    tensors += [q.out_features for q in wrapped] if lora.use_dora else []
    names = {q.name for q in wrapped}
    biases = [n for name, n in shape.biases
              if lora.bias == "all" or (lora.bias == "lora_only" and name.rpartition(".")[0] in names)]
    return Trainables(wrapped, experts, tensors, biases)


def moe_layers(experts: Sequence[Any]) -> dict[str, list[Any]]:
    """The fused expert weights of each mixture-of-experts layer, by the module holding them."""
    layers: dict[str, list[Any]] = {}
    for weight in experts:
        layers.setdefault(weight.name.rpartition(".")[0], []).append(weight)
    return layers


def moe_bytes_per_token(shape: Any, cast: int) -> int:
    """What the mixture-of-experts blocks keep per token and decoder layer (averaged over the layers).

    transformers 5 runs the experts as grouped matmuls (integrations.moe.grouped_mm_experts_forward,
    its default where torch has grouped_mm); per token and chosen expert, autograd keeps the fused
    gate/up output, the activation (the expert's width) and the down projection's output, and the
    router its softmax (fp32): 8.1 KiB a token for 8 experts of width 256 at hidden 256, top 2,
    counted from what autograd saved, where this gives 8.06."""
    total = 0
    for weights in moe_layers(shape.experts).values():
        width = max((w.in_features for w in weights if w.out_features == shape.hidden), default=0)
        per_expert = sum(w.out_features for w in weights) + width
        total += shape.experts_per_token * per_expert * cast + 2 * weights[0].count * 4
    return total // max(shape.layers, 1)


def expert_lora_bytes(wrapped: Sequence[Any], experts_per_token: int, tokens: int, cast: int) -> int:
    """Saved for the backward of LoRA on fused expert weights (peft's ParamWrapper): the weight with
    its LoRA delta folded in (a full copy, in the fp32 the k-bit preparation upcasts experts to, made
    once per forward under parametrize.cached()), and each expert matmul's input, now that the
    weight needs a gradient."""
    return sum(w.count * w.out_features * w.in_features * 4 + tokens * experts_per_token * w.in_features * cast
               for w in wrapped)


def dora_bytes(wrapped: Sequence[Any], tokens: int, dropout: float, device: Device, compute_bytes: int) -> int:
    """What peft's DoRA (DoraLinearLayer.forward) keeps per wrapped layer for the backward: the base
    output and the scaled LoRA output, both multiplied by the magnitude scale (tokens x out each;
    the base output in the fp32 residual dtype, the LoRA output in the autocast dtype on a GPU).
    With dropout the base output is recomputed from the dropped-out input with the dequantized
    weight, which its matmul keeps (out x in, per layer). Measured on the CPU: 330 MiB (no dropout)
    and 429 MiB (dropout) over plain LoRA for 8 layers of hidden 512 at 1,024 tokens, where this
    gives 320 and 416."""
    cast = compute_bytes if device == "cuda" else 4
    weights = sum(q.in_features * q.out_features for q in wrapped) * cast if dropout > 0 else 0
    return sum(tokens * q.out_features for q in wrapped) * (4 + cast) + weights


def variant_activation_bytes(shape: Any, trains: Trainables, lora: LoraConfig, training: TrainingConfig,
                             seq: int, device: Device, compute_bytes: int) -> int:
    """What LoRA on fused experts and DoRA keep beyond plain LoRA's activations (one layer's share
    at a time under gradient checkpointing)."""
    cast = compute_bytes if device == "cuda" else 4
    tokens, checkpointing = training.batch_size * seq, training.gradient_checkpointing
    extra = expert_lora_bytes(trains.experts, shape.experts_per_token, tokens, cast)
    extra += dora_bytes(trains.wrapped, tokens, lora.dropout, device, compute_bytes) if lora.use_dora else 0
    return extra // max(shape.layers, 1) if checkpointing else extra
