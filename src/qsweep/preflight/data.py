"""Training data: templates that can be filled, files that parse and hold the templates' columns,
hub datasets that can be had offline, the validation split that exists, and completions that fit.

Local files are read with train.data's row reader, which names the line to fix.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from qsweep.config.schema import SweepConfig, TrialConfig
from qsweep.preflight.hub import env_flag, hub_dataset_cached
from qsweep.train.data import (
    LOCAL_FORMATS,
    DataFileError,
    completion_ids,
    dataset_folder,
    is_local,
    local_path,
    read_local_rows,
    split_names,
    template_fields,
)

# Rows reported by name before the rest are only counted.
SHOWN_ROWS = 3


def check_template(field: str, template: str) -> list[str]:
    """Rows are rendered with template.format(**row): only named fields can be filled."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return [f"data.{field}: {template!r} is not a valid format string ({exc}); write a column as {{name}} "
                "and a literal brace as {{ or }}"]
    if positional := [f"{{{name}}}" for name in fields if not name or name.split(".")[0].split("[")[0].isdigit()]:
        return [f"data.{field}: {', '.join(positional)} cannot be filled from a row (it is positional); name a "
                "column instead, e.g. {question}"]
    return []


def check_data_file(field: str, path: Path, needed: set[str]) -> list[str]:
    """Present, readable, parseable, not empty, and every row has the columns the templates use."""
    where = f"data.{field}"
    if not path.exists():
        return [f"{where}: file {path} does not exist; fix the path (relative to the sweep file)"]
    if path.is_dir() or path.suffix not in LOCAL_FORMATS:
        return [f"{where}: {path} is not a {', '.join(LOCAL_FORMATS)} file; point it at one"]
    rows = 0
    try:
        for place, row in read_local_rows(path):
            rows += 1
            if missing := needed - set(row):
                return [f"{where}: {place} of {path} lacks column(s) {sorted(missing)} used by data.prompt/"
                        f"data.completion; its columns are {sorted(row)}; add them or change the templates"]
    except DataFileError as exc:
        return [f"{where}: {path}: {exc}"]
    except UnicodeDecodeError:
        return [f"{where}: {path} is not UTF-8 text; re-save it as UTF-8"]
    except OSError as exc:
        return [f"{where}: cannot read {path}: {exc.strerror}; check its permissions"]
    if rows == 0:
        return [f"{where}: {path} has no rows; add examples (a header alone is not enough) or fix the path"]
    return []


def check_hub_dataset(field: str, dataset_id: str) -> list[str]:
    if not env_flag("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") or hub_dataset_cached(dataset_id):
        return []
    return [f"data.{field}: {dataset_id!r} is not a local file (relative to the sweep file) and, offline "
            "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), the hub dataset is not cached; fix the path, point it at a "
            "local .jsonl/.json/.csv file, or download the dataset once while online"]


def check_split(field: str, source: str, split: str, split_field: str, base_dir: Path) -> list[str]:
    """The split must be one the dataset has; checked where its files are here (folder or hub cache)."""
    folder = dataset_folder(source, base_dir)
    splits = split_names(folder) if folder is not None else None
    if splits is None or split in splits:
        return []
    return [f"{split_field}: {source!r} has no split {split!r} (its splits: {', '.join(splits)}); "
            f"set {split_field} to one of them"]


def check_data(sweep: SweepConfig) -> list[str]:
    trial, base_dir = sweep.trial(), sweep.base_dir
    problems = check_template("prompt", trial.data.prompt) + check_template("completion", trial.data.completion)
    if problems:
        return problems  # the columns a broken template needs are unknown
    needed = template_fields(trial.data.prompt) | template_fields(trial.data.completion)
    for field in ("train", "validation"):
        source = getattr(trial.data, field)
        if source is None:
            continue
        if is_local(source, base_dir):
            problems += check_data_file(field, local_path(source, base_dir), needed)
            continue
        if not local_path(source, base_dir).is_dir():
            problems += check_hub_dataset(field, source)
        split, split_field = (("train", "data.train") if field == "train"
                              else (trial.data.validation_split, "data.validation_split"))
        problems += check_split(field, source, split, split_field, base_dir)
    return problems


def _long_completions(path: Path, tokenizer: Any, trial: TrialConfig) -> list[tuple[str, int]]:
    """(place, tokens) of every row whose completion and end-of-text alone exceed max_seq_length."""
    limit = trial.data.max_seq_length
    return [(place, n) for place, row in read_local_rows(path)
            if (n := len(completion_ids(tokenizer, trial.data.completion, row))) > limit]


def check_completion_lengths(trial: TrialConfig, base_dir: Path, model_folder: Path) -> list[str]:
    """A completion that alone exceeds max_seq_length is cut, and the model learns a truncated answer.
    Only local files are read (a hub dataset would have to be loaded); run after the file checks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder, trust_remote_code=trial.model.trust_remote_code)
    limit = trial.data.max_seq_length
    problems = []
    for field in ("train", "validation"):
        source = getattr(trial.data, field)
        if source is None or not is_local(source, base_dir):
            continue
        path = local_path(source, base_dir)
        if not (long := _long_completions(path, tokenizer, trial)):
            continue
        shown = ", ".join(f"{place} ({n} tokens)" for place, n in long[:SHOWN_ROWS])
        more = f" and {len(long) - SHOWN_ROWS} more" if len(long) > SHOWN_ROWS else ""
        problems.append(f"data.{field}: the completion of {shown}{more} of {path} is longer than "
                        f"data.max_seq_length ({limit} tokens, end of text included), so it would be cut; raise "
                        f"data.max_seq_length to at least {max(n for _, n in long)} or shorten those completions")
    return problems
