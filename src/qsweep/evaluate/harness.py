"""Scoring: lm-eval on a model already in memory.

Local tasks (YAML files in evaluation/ or the sweep's include_path) are loaded here so their
`data_files` can be relative to the YAML; lm-eval itself resolves them against the working
directory. Local groups (the offline MMLU, generated into the cache) and built-in tasks go through
lm-eval's TaskManager, indexed once per process (local folders ~0.1 s, with the built-in ones ~14 s).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsweep.config.paths import resolve_path, shipped
from qsweep.config.policy import scoring_dtype

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    scores: dict[str, float]
    raw: dict[str, Any] = field(repr=False)
    samples: dict[str, list[dict]] = field(default_factory=dict, repr=False)
    items: dict[str, list[int]] | None = None
    dtype: str = "float32"  # what it was scored under (config.policy.scoring_dtype)


def include_dirs(extra: list[str], base_dir: Path) -> list[Path]:
    from qsweep.evaluate import mmlu

    dirs = [shipped("evaluation") / "tasks", mmlu.task_folder()]
    return dirs + [resolve_path(value, base_dir) for value in extra]


@functools.lru_cache(maxsize=8)
def _local_task_index(dirs: tuple[Path, ...]) -> dict[str, Path]:
    import yaml

    index: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted(folder.rglob("*.yaml")):
            try:
                head = yaml.load(path.read_text(), Loader=yaml.BaseLoader)
            except yaml.YAMLError:
                continue
            if not isinstance(head, dict):
                continue
            name = head.get("task") if isinstance(head.get("task"), str) else head.get("group")
            if isinstance(name, str):
                index.setdefault(name, path)
    return index


def local_tasks(dirs: list[Path]) -> dict[str, Path]:
    """Local task and group names → their YAML."""
    return _local_task_index(tuple(dirs))


def _is_group(path: Path) -> bool:
    import yaml

    return "group" in yaml.load(path.read_text(), Loader=yaml.BaseLoader)


def _local_task_config(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path)
    files = config.get("dataset_kwargs", {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"]["data_files"] = _relative_to(path.parent, files)
    return config


def _relative_to(folder: Path, files: Any) -> Any:
    """data_files as a string, a list, or a split → file(s) mapping, each made absolute."""
    if isinstance(files, dict):
        return {split: _relative_to(folder, f) for split, f in files.items()}
    if isinstance(files, list):
        return [_relative_to(folder, f) for f in files]
    return str((folder / files).resolve()) if not Path(files).is_absolute() else files


@functools.lru_cache(maxsize=4)
def task_manager(with_builtin: bool, dirs: tuple[Path, ...] = ()) -> Any:
    """One index per process: building the default index costs ~14 s, a local-only one ~0.1 s.
    The local folders resolve local groups by name; the shipped groups (evaluation/groups) combine
    built-in tasks, so they come with the default."""
    from lm_eval.tasks import TaskManager

    paths = [str(d) for d in dirs if d.is_dir()]
    if not with_builtin:
        return TaskManager(include_path=paths or None, include_defaults=False)
    return TaskManager(include_path=[str(shipped("evaluation") / "groups"), *paths], include_defaults=True)


def builtin_task_names() -> set[str]:
    return set(task_manager(True).all_tasks)


def task_specs(tasks: list[str], dirs: list[Path]) -> list[str | dict]:
    """A local task as its config (data paths made absolute); a group or a built-in task by name."""
    local = local_tasks(dirs)
    return [_local_task_config(local[name]) if name in local and not _is_group(local[name]) else name
            for name in tasks]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten_scores(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`acc,none` → `TASK/acc`; MLflow rejects commas, and stderr "N/A" is dropped."""
    scores = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or not _finite(value):
                continue
            name, filter_name = key.split(",", 1)
            base, stderr = (name.removesuffix("_stderr"), "_stderr") if name.endswith("_stderr") else (name, "")
            suffix = name if filter_name == "none" else f"{base}_{filter_name}{stderr}"
            scores[f"{task}/{suffix}"] = float(value)
    return scores


def _sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """Per-item outcome kept for paired tests and reproduction checks: scores and, for
    multiple choice, each choice's log-likelihood."""
    record = {"doc_id": sample["doc_id"], "target": sample.get("target")}
    record.update({k: sample[k] for k in ("acc", "acc_norm", "exact_match") if k in sample})
    responses = sample.get("filtered_resps") or []
    if responses and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in responses):
        record["loglikelihoods"] = [float(r[0]) for r in responses]
    return record


def _leaf_tasks(task_dict: dict) -> dict[str, Any]:
    """Group tasks (mmlu) nest their subtasks; `samples` is keyed by the leaves."""
    leaves: dict[str, Any] = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            leaves.update(_leaf_tasks(value))
        elif value is not None:
            leaves[getattr(key, "group_name", None) or value.config.task] = value
    return leaves


def subset_ids(specs: list[str | dict], limit: int | None, seed: int, manager: Any,
               per_subject: int | None = None) -> dict[str, list[int]]:
    """The same seeded random items of every task for every trial: `limit` per task, and
    `per_subject` per subtask of a group (mmlu: k per subject, a stratified subset) where it is set.
    Drawn at random, not the first N, because task files are often sorted (by subject, by x).
    A task left out is scored on every item."""
    import random

    from lm_eval.tasks import get_task_dict

    chosen = {}
    for key, value in get_task_dict(specs, manager).items():
        grouped = isinstance(value, dict)
        n = per_subject if grouped and per_subject is not None else limit
        if n is None:
            continue
        for name, task in _leaf_tasks({key: value}).items():
            count = len(list(task.eval_docs))
            rng = random.Random(f"{seed}:{name}")
            chosen[name] = sorted(rng.sample(range(count), min(n, count)))
    return chosen


# On a CPU a bigger batch buys no speed (a K-times batch costs K times one), while every item is padded
# to the batch's longest and lm-eval holds fp32 logits (and their log_softmax) for every position of
# every item. Measured on the MMLU guard (57 questions, SmolLM2-135M in 4 bit, one thread, bf16, CPU
# seconds under load): batch 1 28.5 s, 4 25.9 s, 16 45.8 s.
CPU_BATCH = 4


def auto_batch_size(model: Any) -> int | str:
    """On CUDA, lm-eval's own probe finds the largest batch that fits. On a CPU, CPU_BATCH, fewer when
    available memory would not hold the logits of that many 512-token items."""
    import torch

    if torch.cuda.is_available():
        return "auto"
    available = _available_memory_bytes()
    vocab = model.config.get_text_config().vocab_size if hasattr(model, "config") else 32000
    per_item = 512 * vocab * 4 * 3
    return max(1, min(CPU_BATCH, int(0.25 * available / per_item)))


def _available_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 4 * 2**30


def report_environment_once() -> None:
    """lm-eval adds torch's environment report to every result, and torch builds it anew each time:
    `pip list` and probes for CUDA tools, in subprocesses (0.5 s a scoring on two cores, a sixth of
    scoring a trial). What it reports cannot change within a process, so it is built once here."""
    from torch.utils import collect_env

    if not hasattr(collect_env.get_pretty_env_info, "cache_info"):
        collect_env.get_pretty_env_info = functools.cache(collect_env.get_pretty_env_info)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    dirs: list[Path],
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int | str = "auto",
    subset_seed: int = 0,
    per_subject: int | None = None,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
    fewshot_as_multiturn: bool | None = None,
    dtype: str = "float32",
) -> EvalResult:
    """Scores the model in memory, under autocast to `dtype` unless it is float32 (see
    config.policy.scoring_dtype); `limit` / `per_subject` draw a seeded subset of items, recorded in
    the result. With `apply_chat_template` lm-eval writes each prompt with the tokenizer's chat
    template (as a chat model is used); the template and its sha256 go into the results, as lm-eval's
    own CLI records them."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from qsweep.evaluate.mmlu import fewshot_problem

    if problem := fewshot_problem(tasks, num_fewshot):
        raise ValueError(problem)
    specs = task_specs(tasks, dirs)
    local = local_tasks(dirs)
    manager = task_manager(any(isinstance(s, str) and s not in local for s in specs), tuple(dirs))
    samples = subset_ids(specs, limit, subset_seed, manager, per_subject) if limit or per_subject else None
    if batch_size == "auto":
        batch_size = auto_batch_size(model)
    # lm-eval's own mixed precision: autocast around each forward. Autocast rather than casting the
    # model: the 4-bit layers already compute in the compute dtype, and the fp32 layers (embeddings,
    # norms, the head) keep their weights, as in training on CUDA, while their matmuls run in `dtype`.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=64,
              mixed_precision_dtype=None if dtype == "float32" else dtype)
    report_environment_once()
    multiturn = apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn
    raw = simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=num_fewshot,
        samples=samples,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=1000,
        apply_chat_template=apply_chat_template,
        system_instruction=system_instruction,
        fewshot_as_multiturn=multiturn,
    )
    raw.update(chat_settings(tokenizer, apply_chat_template, system_instruction, multiturn))
    records = {task: [_sample_record(s) for s in items] for task, items in raw.get("samples", {}).items()}
    return EvalResult(scores=flatten_scores(raw["results"]), raw=raw, samples=records, items=samples, dtype=dtype)


# How the prompts were written: the keys lm-eval's CLI gives them in its results file.
CHAT_KEYS = ("chat_template", "chat_template_sha", "system_instruction", "system_instruction_sha", "fewshot_as_multiturn")


def chat_settings(tokenizer: Any, apply_chat_template: bool, system_instruction: str | None,
                  fewshot_as_multiturn: bool) -> dict[str, Any]:
    template = tokenizer.chat_template if apply_chat_template else None
    values = (template, text_sha256(template), system_instruction, text_sha256(system_instruction), fewshot_as_multiturn)
    return dict(zip(CHAT_KEYS, values))


def text_sha256(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def model_device(model: Any) -> str:
    return next(model.parameters()).device.type


def score(model: Any, tokenizer: Any, evaluation: Any, base_dir: Path, quantization: Any,
          stage: Any = None) -> EvalResult:
    """Scores with a trial's evaluation config, in the dtype config.policy.scoring_dtype picks for
    the model's `quantization` on its device. A final stage's `limit` and `per_subject` replace the
    config's, and its `tasks` are scored too."""
    items = stage if stage is not None else evaluation
    tasks = [*evaluation.tasks, *(stage.tasks if stage is not None else [])]
    return evaluate_model(
        model, tokenizer, tasks, include_dirs(evaluation.include_path, base_dir),
        num_fewshot=evaluation.num_fewshot, limit=items.limit, per_subject=items.per_subject,
        batch_size=evaluation.batch_size, subset_seed=evaluation.subset_seed,
        apply_chat_template=evaluation.apply_chat_template, system_instruction=evaluation.system_instruction,
        fewshot_as_multiturn=evaluation.fewshot_as_multiturn,
        dtype=scoring_dtype(quantization.compute_dtype, model_device(model)),
    )
