"""Peak memory of one trial, from its config, the model's config.json (no weights) and its data's
token lengths.

Longer than 400 lines: one model of a trial's memory whose terms (4-bit storage, LoRA, optimizer,
activations per layer, the loss and validation buffers, CPU heap) are read and checked together
against one measured peak; the activation terms are the part to move out when it grows further.

The estimate is what Ray needs to pack several trials onto one GPU, and what validation needs to
say "this trial cannot fit" before anything is loaded. It models what `trial.run_trial` actually
does, not textbook QLoRA: `prepare_model_for_kbit_training` upcasts every non-4-bit parameter to
fp32, so embeddings, norms and an untied head cost 4 bytes/param whatever the compute dtype, and the
residual stream (embedding output, norms, `Linear4bit` outputs, which bitsandbytes casts back to
the input's dtype) stays fp32 even under bf16 autocast. Only what autocast re-casts (attention
inputs, LoRA inputs) is saved in the compute dtype.

The peak of a training step is at the start of the backward pass: every activation saved by the
forward pass is still held, and the loss's backward holds three fp32 [tokens x vocab] buffers
(log-softmax output, its gradient, the gradient of the logits). With gradient checkpointing only
each layer's input is held, and the peak is the larger of that loss moment and the backward of one
recomputed layer. Optimizer state exists from step 2 on and is counted in full; so are the LoRA
gradients, although at the loss moment they do not exist yet (a small, deliberate overestimate).

Activations are sized for the longest padded batch the trial is expected to read, not for rows of
max_seq_length: the trial's collator pads each batch to its longest row, so with real instruction
data most batches are far shorter than the limit. train.lengths profiles the data's tokenized rows
and picks that length per trial (its batch size, steps and max_seq_length): the longest row when
the trial reads every row, else the smallest length a longer row exceeds with probability under
1/1,000. A validation pass reads every validation row without gradients; its peak (the loss's
[tokens x vocab] buffers) counts when its longest row makes it the larger one. Without a profile
(data that cannot be read here), rows are taken at max_seq_length, as before.

Checked on the CPU against real QLoRA training steps (tests/test_estimate.py,
bench/results/estimator_cpu.json: within 5% of the allocator peak), and against the peaks real
trials measure with lengths from real data (bench/estimate_lengths.py, 33 trials of three models on
the quickstart's configs and on mixed long and short rows: 0.90-1.15x; sized for max_seq_length the
same trials came out 1.2-2.5x). The bf16-autocast dtypes were
checked by running the forward pass under CPU autocast and summing what autograd saves per layer;
the CUDA-only terms (context, one-byte dropout masks) are not measured here; on CUDA a trial's
peak is what torch's allocator reserves, which this estimate (`tensors`) is compared with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from qsweep.config.policy import Device, compute_dtype_name, optimizer_name
from qsweep.config.schema import TrialConfig
from qsweep.train import structure
from qsweep.resources import variants
from qsweep.train.lengths import BatchLength, DataLengths, eval_batch_length, training_batch_length

MIB = 2**20

# bitsandbytes 4-bit: two values per byte; one absmax per block of 64 values (bnb's default for
# Params4bit). Double quantization stores the absmax as uint8 and adds one fp32 absmax per 256 of
# them, plus a 256-entry fp32 code table and an fp32 offset per layer.
BLOCK_4BIT = 64
BLOCK_NESTED = 256
QUANT_MAP_BYTES = 16 * 4  # each layer keeps its own nf4/fp4 16-value table
NESTED_CODE_BYTES = 256 * 4 + 4

# bitsandbytes 8-bit optimizers quantize each state in blocks of 256 with an fp32 absmax, and keep
# tensors smaller than this in fp32 (their min_8bit_size default).
OPT8_BLOCK = 256
OPT8_MIN_SIZE = 4096

# What a CUDA process holds outside torch's allocator: driver context, the kernels of torch, cuBLAS(Lt),
# attention and bitsandbytes as they load. Only the default: each trial measures its own through NVML
# (`cuda_context_mb`), and once measured on a card that figure replaces this one there
# (resources.packing.cuda_context). 0.6-1 GB is common with all those kernels loaded; this guess is
# from torch 2.x reports of a bare context and may be low.
CUDA_CONTEXT_MIB = 550.0

# On the CPU, what grows during training besides tensors (autograd graph, Trainer and dataloader
# objects, modules imported on the first step, oneDNN scratch): 22-24 MiB on a 2-layer model where
# nothing else is left (bench/results/estimate_lengths_cpu.json), 25-35 MiB over the allocator's
# peak for 8 to 30 layers with glibc's heap kept small (tests/test_estimate.py). Not included: the
# interpreter and its libraries, ~550 MiB of RSS before any model is loaded and the same for every
# trial; add them when sizing a CPU worker's memory.
CPU_RUNTIME_MIB = 24.0
# On the CPU in bf16 (AMX or AVX512-BF16; no autocast, only the 4-bit layers compute in bf16), the
# bf16 kernels' code and scratch on top of that: on tiny-llama, where nothing else is left, the same
# trial peaks 15-37 MiB higher in bf16 than in fp32 on one 2-core AMD EPYC with AVX512-BF16 (17-20
# MiB one hour, 24-37 another, same venv: 46 vs 62 MiB on the quickstart's rows), so the middle of
# that range; tests/test_estimate_lengths.py allows the spread.
CPU_BF16_RUNTIME_MIB = 26.0

# On the CPU, glibc's heap: a sweep's workers mmap blocks of 4 MiB and more, which go back when freed
# (orchestrate.driver sets MALLOC_MMAP_THRESHOLD_), and take smaller ones from the heap, where freed
# blocks stay resident and the next step reuses them only in part. At SmolLM2-135M's peak glibc
# held ~200 MiB of free heap (mallinfo2 at the loss, quickstart), appearing from the second step
# on. Fitted on 33 real trials (three models of 2, 8 and 30 layers, short and mixed rows): a share
# of the 4-bit weights' size at fp32 (what each step's dequantized copies add up to) plus a share of
# the activations. Measured again in bf16 the same 33 came out 0.89-1.27x their peaks (tiny-llama's
# quickstart rows highest: 10 MiB over a 45 MiB peak); with SAFETY_MARGIN no trial exceeded its budget.
CPU_HEAP_SLACK_PER_WEIGHT = 0.7 * 4  # bytes per 4-bit parameter
CPU_HEAP_SLACK_OF_ACTIVATIONS = 0.2


class MemoryEstimate(BaseModel):
    """Peak memory of one trial in MiB, by component; `total` is what the device must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Device
    quantized_weights: float
    unquantized_weights: float
    lora_params: float
    lora_grads: float
    optimizer_state: float
    activations: float
    runtime_overhead: float
    total: float
    # CPU only: free heap glibc keeps resident at the peak (see CPU_HEAP_SLACK_*); part of `total`.
    heap_slack: float = 0.0
    # Counts behind the figures, so a surprising number can be traced to its cause.
    quantized_param_count: int
    unquantized_param_count: int
    lora_param_count: int
    tokens_per_step: int  # of the longest padded batch: batch_size x sequence.tokens
    # The row length the activations are sized for, and why (train.lengths); the longest validation
    # row when the trial evaluates, else None.
    sequence: BatchLength
    eval_seq_length: int | None = None

    @property
    def tensors(self) -> float:
        """The tensor part, what a trial's peak_memory_mb is compared with (CUDA: torch's reserved
        peak, which the cap limits; CPU: the allocator's growth, without the free heap glibc keeps).
        Paged optimizer state lives in managed memory, outside it."""
        return self.total - self.runtime_overhead - self.heap_slack

    def format(self, title: str = "") -> str:
        rows = [
            ("4-bit base weights", self.quantized_weights),
            ("fp32 embeddings/norms/head", self.unquantized_weights),
            ("LoRA parameters", self.lora_params),
            ("LoRA gradients", self.lora_grads),
            ("optimizer state", self.optimizer_state),
            ("activations (peak)", self.activations),
            ("CUDA context" if self.device == "cuda" else "runtime overhead", self.runtime_overhead),
            *([("free heap kept resident", self.heap_slack)] if self.device == "cpu" else []),
            ("total", self.total),
        ]
        head = f"{title} ({self.device})" if title else self.device
        lines = [head] + [f"  {name:<28}{mib:>10.1f} MiB" for name, mib in rows]
        return "\n".join(lines + [f"  {self.sequence.describe()}"])


@dataclass(frozen=True)
class _Linear:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from the architecture, read from a meta-device model."""

    quantized: tuple[_Linear, ...]  # the layers bitsandbytes turns into Linear4bit
    # Linear layers fed the very same tensor (q/k/v, gate/up) share an index; see _input_groups.
    input_group: tuple[tuple[str, int], ...]
    linears: tuple[_Linear, ...]  # every linear layer but the output head: LoRA's candidates
    unquantized_params: int  # elements, tied weights once
    buffer_bytes: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    glu_mlp: bool
    experts: tuple[variants.ExpertWeight, ...] = ()  # fused expert weights, none for a dense model
    experts_per_token: int = 0
    biases: tuple[tuple[str, int], ...] = ()  # (name, elements) of every bias: what lora.bias may train
    attention_maps: int = 0  # [seq x seq] maps per head eager attention keeps; 0 with SDPA (variants)


@lru_cache(maxsize=16)
def model_shape(model_path: Path, trust_remote_code: bool = False) -> ModelShape:
    """The model's shape, read once per machine (train.structure)."""
    stored = structure.read_once("shape", model_path, trust_remote_code,
                                 lambda: asdict(read_model_shape(model_path, trust_remote_code)))
    layers = {key: tuple(_Linear(**layer) for layer in stored[key]) for key in ("quantized", "linears")}
    pairs = {key: tuple(tuple(pair) for pair in stored[key]) for key in ("input_group", "biases")}
    experts = tuple(variants.ExpertWeight(**weight) for weight in stored["experts"])
    return ModelShape(**{**stored, **layers, **pairs, "experts": experts})


def read_model_shape(model_path: Path, trust_remote_code: bool = False) -> ModelShape:
    """Builds the model on the meta device from config.json and sorts its parameters the way
    transformers' bitsandbytes integration will, using its own skip rules so they cannot drift."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    from qsweep.train.targets import MLP_PARENTS, is_lora_candidate, meta_model

    model = meta_model(model_path, trust_remote_code)
    config = model.config
    # The same list Bnb4BitHfQuantizer builds: tied weights, the last parameter, the output head,
    # plus the model's own keep-in-fp32 modules.
    skip = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])

    quantized: list[_Linear] = []
    quantized_ids: set[int] = set()
    linears: list[_Linear] = []
    for name, module in model.named_modules():
        # LoRA candidates are tested with isinstance, bnb's conversion with `type() is`.
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        # Conv1D stores its weight transposed: (in, out).
        rows, cols = module.weight.shape
        layer = _Linear(name, *((rows, cols) if isinstance(module, Conv1D) else (cols, rows)))
        if is_lora_candidate(model, name, module):
            linears.append(layer)
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip):
            quantized.append(layer)
            quantized_ids.add(id(module.weight))

    # named_parameters() yields a tied weight once, so tied embeddings are counted once.
    unquantized = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())

    names = [layer.name for layer in linears]
    groups = _input_groups(model, names)

    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = config.num_hidden_layers
    # The MLP width from the layers themselves: configs spell it intermediate_size, n_inner (None
    # meaning 4 x hidden), ffn_dim...; a GLU MLP has two layers that widen to it (gate and up).
    in_mlp = [q for q in quantized if any(p in part for part in q.name.lower().split(".")[:-1] for p in MLP_PARENTS)]
    widths = [q.out_features for q in in_mlp or quantized if q.out_features > hidden and q.in_features == hidden]
    intermediate = max(widths, default=4 * hidden)
    widening = sum(1 for w in widths if w == intermediate) / max(layers, 1)
    return ModelShape(
        quantized=tuple(quantized),
        input_group=tuple((name, groups[name]) for name in names),
        linears=tuple(linears),
        unquantized_params=unquantized,
        buffer_bytes=buffer_bytes,
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        glu_mlp=widening >= 2,
        **variants.variant_fields(model),
    )


def _input_groups(model, names: list[str]) -> dict[str, int]:
    """Which linear layers read the same input tensor, from one forward pass on the meta device.

    Without dropout a LoRA layer keeps its input as is, so layers reading the same tensor keep it
    once; names cannot tell (Llama's o_proj has q_proj's shape and parent), the forward pass can.
    If an architecture cannot run on the meta device, every layer counts alone (an overestimate)."""
    import torch

    wanted = set(names)
    first_reader: dict[int, str] = {}
    group: dict[str, int] = {}
    keep: list = []  # holds the inputs so their ids are not reused during the pass

    def record(name: str, inputs: tuple) -> None:
        tensor = inputs[0]
        keep.append(tensor)
        owner = first_reader.setdefault(id(tensor), name)
        group[name] = names.index(owner)

    handles = [
        module.register_forward_pre_hook(lambda _m, inputs, name=name: record(name, inputs))
        for name, module in model.named_modules()
        if name in wanted
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    except Exception:  # noqa: BLE001 - any failure just means no sharing is assumed
        group = {}
    finally:
        for handle in handles:
            handle.remove()
    return {name: group.get(name, index) for index, name in enumerate(names)}


def quantized_bytes(numel: int, double_quant: bool) -> int:
    """Storage of one Linear4bit weight: packed nibbles, absmax per 64, and the quant tables.

    nf4 and fp4 cost the same; only the 16-value table differs."""
    blocks = math.ceil(numel / BLOCK_4BIT)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + blocks * 4 + QUANT_MAP_BYTES
    return packed + blocks + math.ceil(blocks / BLOCK_NESTED) * 4 + NESTED_CODE_BYTES + QUANT_MAP_BYTES


def optimizer_bytes(lora_shapes: list[int], optimizer: str) -> int:
    """AdamW keeps two moments per parameter: fp32 for the 32-bit optimizers, blockwise uint8 for
    the 8-bit ones (tensors under 4096 elements stay fp32). Paged states are still counted: they
    live on the GPU while the step runs and only move out under memory pressure."""
    if "8bit" not in optimizer:
        return sum(8 * n for n in lora_shapes)
    return sum(8 * n if n < OPT8_MIN_SIZE else 2 * n + 2 * 4 * math.ceil(n / OPT8_BLOCK) for n in lora_shapes)


def _dtype_bytes(compute_dtype: str, device: Device) -> int:
    return 4 if compute_dtype_name(compute_dtype, device) == "float32" else 2


def activation_bytes(
    shape: ModelShape,
    lora_inputs: list[tuple[int, int]],
    r: int,
    lora_count: int,
    dropout: float,
    batch: int,
    seq: int,
    checkpointing: bool,
    device: Device,
    compute_bytes: int,
) -> int:
    """Peak bytes of saved activations plus the backward's transient buffers.

    `lora_inputs` holds (in_features, input group) of every LoRA-wrapped layer, all layers."""
    tokens = batch * seq
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    res = 4  # fp32 residual stream: see the module docstring
    # Autocast (GPU with bf16/fp16) saves attention and LoRA inputs in the compute dtype; on the CPU
    # the Trainer runs without autocast and peft casts LoRA inputs back to the fp32 LoRA weights.
    cast = compute_bytes if device == "cuda" else 4

    # Per decoder layer, what autograd keeps for the backward pass (the 4-bit matmul keeps only its
    # packed weight and recomputes the dequantization, so the base linears add nothing):
    # two norms keep their input and 1/rms per token;
    norms = 2 * (h * res + 4)
    # attention (fused SDPA) keeps q, k, v, output and the log-sum-exp per head. With a padding
    # mask (the trial's collator pads each batch to its longest row, so any batch > 1 has one)
    # transformers repeats k/v to all heads, and SDPA keeps a float copy of the [seq x seq] mask in
    # every layer; a batch of one needs no mask and k/v keep their own (GQA) head count;
    padded = batch > 1
    kv = shape.heads if padded else shape.kv_heads
    attention = (2 * shape.heads + 2 * kv) * shape.head_dim * cast + shape.heads * 4 + (seq * cast if padded else 0)
    attention += variants.eager_attention_bytes(shape, seq, cast)
    # a GLU MLP keeps the gate output (for SiLU), SiLU's output and the up output (for the product);
    # a plain MLP keeps the first projection's output and what its activation function needs.
    mlp = variants.moe_bytes_per_token(shape, cast) if shape.experts else (3 if shape.glu_mlp else 2) * i * res
    base_per_layer = tokens * (norms + attention + mlp)

    # Every LoRA layer keeps its dropped-out input (for lora_A's gradient), the dropout mask (CUDA:
    # one byte; CPU dropout multiplies by a float noise tensor and keeps it) and lora_A's output.
    # Each wrapped layer has its own dropout, so q, k and v keep three copies of the same input.
    # Without dropout, and without autocast making a copy per layer, they all keep the one input.
    mask = (1 if device == "cuda" else res) if dropout > 0 else 0
    copies_per_layer = dropout > 0 or cast < 4
    kept_inputs = {(index, g) if copies_per_layer else g: n for index, (n, g) in enumerate(lora_inputs)}
    lora_total = sum(tokens * n * cast for n in kept_inputs.values())
    lora_total += sum(tokens * (n * mask + r * cast) for n, _ in lora_inputs)

    # The peak is the larger of two moments of the backward pass.
    # 1. The loss's backward, first thing: log-softmax output, the gradient arriving at it and the
    # gradient it produces, all fp32 [tokens x vocab] (transformers upcasts logits before
    # cross-entropy), on top of everything saved. For small models this is the largest buffer.
    loss = 3 * tokens * v * 4
    # 2. One layer's backward: gradients into and out of the layer, one MLP-wide gradient, and the
    # 4-bit matmul's dequantized weight (a temporary in the compute dtype; the largest layer's).
    dequant = max((q.in_features * q.out_features for q in shape.quantized), default=0) * compute_bytes
    layer_work = tokens * ((2 * h + i) * res + 2 * variants.eager_attention_bytes(shape, seq, 4)) + dequant
    final_norm = tokens * (h * res + 4)
    # Autocast casts every LoRA weight once per step and keeps the copies, and the fp32 head's copy
    # is kept by its matmul for the backward pass.
    copies = (lora_count + v * h) * cast if cast < 4 else 0

    if not checkpointing:
        return shape.layers * base_per_layer + lora_total + final_norm + copies + max(loss, layer_work)
    # Checkpointing keeps each layer's input; during backward one layer at a time is recomputed,
    # and holds all it saves while its backward runs.
    inputs = shape.layers * tokens * h * res
    one_layer = base_per_layer + lora_total // max(shape.layers, 1)
    return inputs + final_norm + copies + max(loss, one_layer + layer_work)


def eval_activation_bytes(shape: ModelShape, batch: int, seq: int, compute_bytes: int) -> int:
    """Peak bytes of one validation batch: without gradients nothing is saved, and the peak is the
    loss's fp32 [tokens x vocab] buffers (logits, their fp32 copy, log-softmax) or one layer's work."""
    tokens = batch * seq
    dequant = max((q.in_features * q.out_features for q in shape.quantized), default=0) * compute_bytes
    layer_work = tokens * (2 * shape.hidden + 3 * shape.intermediate) * 4 + dequant
    return tokens * (shape.hidden * 4 + 4) + max(3 * tokens * shape.vocab * 4, layer_work)


def estimate_trial_memory(trial: TrialConfig, model_path: Path, device: str,
                          lengths: DataLengths | None = None,
                          context_mb: float = CUDA_CONTEXT_MIB) -> MemoryEstimate:
    """Peak memory of one trial of `trial` on `device` ("cuda" or "cpu"), from config.json and, when
    given, the data's token lengths (train.lengths): activations are sized for the longest padded
    batch the trial is expected to read; without `lengths`, for rows of max_seq_length. On
    CUDA `context_mb` is the process's context (measured on the card, once known)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    dev: Device = "cuda" if device == "cuda" else "cpu"
    shape = model_shape(Path(model_path).resolve(), trial.model.trust_remote_code)
    quant, lora, training = trial.quantization, trial.lora, trial.training

    quantized = sum(quantized_bytes(q.in_features * q.out_features, quant.double_quant) for q in shape.quantized)
    quantized_count = sum(q.in_features * q.out_features for q in shape.quantized)
    unquantized = shape.unquantized_params * 4 + shape.buffer_bytes

    trains = variants.lora_trainables(shape, lora)
    group = dict(shape.input_group)
    lora_count = sum(trains.tensors)
    lora_bytes = 4 * lora_count
    optimizer = optimizer_bytes(trains.tensors + trains.biases, optimizer_name(training.optimizer, dev))

    compute_bytes = _dtype_bytes(quant.compute_dtype, dev)
    sequence = training_batch_length(lengths, training, trial.data.max_seq_length)
    activations = activation_bytes(
        shape,
        [(q.in_features, group[q.name]) for q in trains.wrapped],
        lora.r,
        lora_count,
        lora.dropout,
        training.batch_size,
        sequence.tokens,
        training.gradient_checkpointing,
        dev,
        compute_bytes,
    )
    activations += variants.variant_activation_bytes(shape, trains, lora, training, sequence.tokens, dev,
                                                     compute_bytes)
    # Each evaluation reads every validation row; its batches can be longer than any training batch.
    evaluates = trial.data.validation is not None and (training.max_steps is None
                                                       or training.max_steps >= training.eval_every)
    eval_seq = eval_batch_length(lengths, trial.data.max_seq_length) if evaluates else None
    if eval_seq is not None:
        activations = max(activations, eval_activation_bytes(shape, training.batch_size, eval_seq, compute_bytes))
    overhead = context_mb if dev == "cuda" else CPU_RUNTIME_MIB + (CPU_BF16_RUNTIME_MIB if compute_bytes == 2 else 0)
    slack = 0.0 if dev == "cuda" else (
        CPU_HEAP_SLACK_PER_WEIGHT * quantized_count + CPU_HEAP_SLACK_OF_ACTIVATIONS * activations) / MIB

    grads = lora_bytes + 4 * sum(trains.biases)
    parts = [quantized, unquantized, lora_bytes, grads, optimizer, activations]
    total = sum(parts) / MIB + overhead + slack
    return MemoryEstimate(
        device=dev,
        quantized_weights=quantized / MIB,
        unquantized_weights=unquantized / MIB,
        lora_params=lora_bytes / MIB,
        lora_grads=grads / MIB,
        optimizer_state=optimizer / MIB,
        activations=activations / MIB,
        runtime_overhead=overhead,
        total=total,
        heap_slack=slack,
        quantized_param_count=quantized_count,
        unquantized_param_count=shape.unquantized_params,
        lora_param_count=lora_count,
        tokens_per_step=training.batch_size * sequence.tokens,
        sequence=sequence,
        eval_seq_length=eval_seq,
    )
