"""The evaluation cache: a score of the untuned base, reused by every later sweep asking the same question.

A score is stored under everything it depends on: the model's weights hash, the quantization
config (with `auto` resolved to what this machine runs), the dtype it was scored under
(config.policy.scoring_dtype), the content of every task (its YAML
files, the templates they include, the Python files beside them and the data files they read, for
local tasks; the name and lm-eval's version for built-in ones), the items (the seeded subset:
limit or per-subject count and seed over that content; the drawn ids are stored in the entry), num_fewshot and
lm-eval's version; and how the prompts are written when not as plain text (the chat template's
sha256, the system instruction, few-shot examples as turns). Entries are small JSON files under
$QSWEEP_CACHE/evaluations, written atomically, so concurrent sweeps can share the folder; an
unreadable entry is ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from qsweep.config.paths import cache_dir, shipped

logger = logging.getLogger(__name__)

FOLDER = "evaluations"


class _TolerantLoader(yaml.SafeLoader):
    """lm-eval task YAMLs use tags such as `!function utils.process_docs`: read them as plain text."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: f"{suffix} {getattr(node, 'value', '')}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.load(path.read_text(), Loader=_TolerantLoader)
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _names(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


@functools.lru_cache(maxsize=8)
def _task_files(dirs: tuple[Path, ...]) -> dict[str, tuple[Path, ...]]:
    """Every name a local YAML defines (task, group or tag) -> the YAML files that define it."""
    index: dict[str, list[Path]] = {}
    for folder in dirs:
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            head = _read_yaml(path)
            # A group's `task:` is a list of its members, defined elsewhere; a task's is its own name.
            own = head.get("task") if isinstance(head.get("task"), str) else None
            for name in {*_names(own), *_names(head.get("group")), *_names(head.get("tag"))}:
                index.setdefault(name, []).append(path)
    return {name: tuple(paths) for name, paths in index.items()}


@functools.lru_cache(maxsize=256)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of one file; keyed by size and mtime too, so a file shared by many tasks is read once."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    stat = path.stat()
    return _file_digest(path.resolve(), stat.st_size, stat.st_mtime_ns)


def _data_files(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f for v in value.values() for f in _data_files(v)]
    if isinstance(value, list):
        return [f for v in value for f in _data_files(v)]
    return [value] if isinstance(value, str) else []


def _collect(path: Path, task_folder: Path, files: dict[str, Path]) -> list[str]:
    """Adds one YAML, what it includes and the data it reads to `files`; returns the tasks it names."""
    files[f"yaml:{path.resolve()}"] = path
    for script in sorted(path.parent.glob("*.py")):  # `!function utils.x` runs code from beside the YAML
        files[f"code:{script.resolve()}"] = script
    config = _read_yaml(path)
    include = config.get("include")
    if isinstance(include, str) and (path.parent / include).is_file():
        _collect(path.parent / include, task_folder, files)
    # qsweep resolves data_files against the task's own YAML (see harness._relative_to).
    for name in _data_files((config.get("dataset_kwargs") or {}).get("data_files")):
        data = Path(name) if Path(name).is_absolute() else task_folder / name
        files[f"data:{data.resolve()}"] = data
    members = config.get("task") if config.get("group") is not None else None
    entries = members if isinstance(members, list) else []
    for entry in entries:
        if isinstance(entry, dict):
            for name in _data_files((entry.get("dataset_kwargs") or {}).get("data_files")):
                data = Path(name) if Path(name).is_absolute() else task_folder / name
                files[f"data:{data.resolve()}"] = data
    return [e if isinstance(e, str) else e.get("task") for e in entries
            if isinstance(e, str) or isinstance(e, dict) and isinstance(e.get("task"), str)]


def task_content_hash(name: str, dirs: list[Path]) -> str:
    """What a task's scores depend on. A local task (or group, or tag) hashes every YAML it is made
    of, their templates and code, and each data file once, however many subtasks share it; a
    built-in task is its name and lm-eval's version (its YAML ships inside lm-eval)."""
    index = _task_files(tuple([*dirs, shipped("evaluation") / "groups"]))
    files: dict[str, Path] = {}
    builtin: set[str] = set()
    pending, seen = [name], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current not in index:
            builtin.add(current)
            continue
        for path in index[current]:
            pending += _collect(path, path.parent, files)
    digest = hashlib.sha256()
    for label in sorted(files):
        kind = label.split(":", 1)[0]
        path = files[label]
        digest.update(f"{kind}:{path.name}:{file_digest(path) if path.is_file() else 'missing'}\n".encode())
    for builtin_name in sorted(builtin):
        digest.update(f"builtin:{builtin_name}:lm_eval {version('lm_eval')}\n".encode())
    return digest.hexdigest()


def chat_ingredients(evaluation: Any, chat_template: str | None) -> dict[str, Any]:
    """How the prompts are written (`chat_template`: the template's text in effect); empty for plain
    prompts, so their keys stay what they were before chat scoring existed."""
    if not evaluation.apply_chat_template and evaluation.system_instruction is None:
        return {}
    multiturn = evaluation.fewshot_as_multiturn
    multiturn = evaluation.apply_chat_template if multiturn is None else multiturn
    template = chat_template if evaluation.apply_chat_template else None
    return {"chat": {"template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
                     "system_instruction": evaluation.system_instruction, "fewshot_as_multiturn": multiturn}}


def baseline_ingredients(model_hash: str, quant: Any, compute_dtype: str, evaluation: Any,
                         dirs: list[Path], scoring_dtype: str, chat_template: str | None = None) -> dict[str, Any]:
    """Everything a score of the untuned base depends on (see the module's docstring);
    `chat_template` is the template's text when evaluation.apply_chat_template is on."""
    return {
        "kind": "untuned base",
        "model_hash": model_hash,
        "quantization": {"quant_type": quant.quant_type, "double_quant": quant.double_quant,
                         "compute_dtype": compute_dtype},
        "scoring_dtype": scoring_dtype,
        "tasks": {task: task_content_hash(task, dirs) for task in evaluation.tasks},
        "items": {"limit": evaluation.limit, "per_subject": evaluation.per_subject, "subset_seed": evaluation.subset_seed},
        "num_fewshot": evaluation.num_fewshot,
        **chat_ingredients(evaluation, chat_template),
        "lm_eval": version("lm_eval"),
    }


def cache_key(ingredients: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:32]


def entry_path(key: str) -> Path:
    return cache_dir() / FOLDER / f"{key}.json"


def load(key: str) -> dict[str, Any] | None:
    """The cached entry, or None when there is none or it cannot be trusted (then it is rescored)."""
    path = entry_path(key)
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        scores = entry["scores"]
        valid = (entry.get("key") == key and isinstance(scores, dict) and scores
                 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values()))
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        logger.warning("ignoring the unreadable evaluation cache entry %s; the score is computed again", path)
        return None
    return entry


def store(key: str, ingredients: dict[str, Any], scores: dict[str, float],
          items: dict[str, list[int]] | None) -> Path:
    """Writes the entry atomically: a reader sees the old file or the whole new one, never a part."""
    path = entry_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"key": key, "ingredients": ingredients, "scores": scores, "items": items}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{key}.", suffix=".tmp", delete=False) as handle:
        json.dump(entry, handle, indent=1)
    os.replace(handle.name, path)
    return path
