"""Training data: templates that can be filled, files that parse and hold the templates' columns,
hub datasets that can be had offline, the validation split that exists, and completions that fit.
Conversations (rows rendered with the chat template) are checked in preflight.chat.

Local files are read with train.data's row reader, which names the line to fix.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from qsweep.config.schema import SweepConfig, TrialConfig
from qsweep.preflight import chat as chat_checks
from qsweep.preflight.hub import env_flag, hub_dataset_cached
from qsweep.train import chat
from qsweep.train.data import (
    LOCAL_FORMATS,
    PLAIN,
    PROMPT_COMPLETION,
    DataFileError,
    completion_ids,
    data_kind,
    dataset_folder,
    is_local,
    leading_special_tokens,
    local_path,
    plain_templates,
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


def check_data_file(field: str, path: Path, needed: set[str],
                    used_by: str = "data.prompt/data.completion") -> list[str]:
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
                return [f"{where}: {place} of {path} lacks column(s) {sorted(missing)} used by {used_by}; its "
                        f"columns are {sorted(row)}; add them or change {used_by}"]
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


def file_kinds(trial: TrialConfig, base_dir: Path) -> dict[str, str]:
    """The row kind (train.data.row_kind) of each local data file, by its first row; a file that
    cannot be read or has no rows is left out (check_data_file reports it)."""
    kinds = {}
    for field in ("train", "validation"):
        source = getattr(trial.data, field)
        if source is None or not is_local(source, base_dir) or not local_path(source, base_dir).is_file():
            continue
        try:
            first = next(iter(read_local_rows(local_path(source, base_dir))), None)
        except (DataFileError, UnicodeDecodeError, OSError):
            continue
        if first is not None:
            kinds[field] = data_kind(trial.data, first[1])
    return kinds


def _conversation_columns(trial: TrialConfig, kind: str) -> tuple[set[str], str]:
    if kind == PROMPT_COMPLETION:
        return {"prompt", "completion"}, "conversational prompt/completion rows"
    column = trial.data.messages or "messages"
    return {column}, f"data.messages ({column!r})"


def check_data(sweep: SweepConfig) -> list[str]:
    trial, base_dir = sweep.trial(), sweep.base_dir
    kinds = file_kinds(trial, base_dir)
    prompt, completion = plain_templates(trial.data.prompt, trial.data.completion)
    problems = check_template("prompt", prompt) + check_template("completion", completion)
    if problems:
        return problems  # the columns a broken template needs are unknown
    problems += chat_checks.check_template_file(trial, base_dir)
    for field in ("train", "validation"):
        source = getattr(trial.data, field)
        if source is None:
            continue
        if is_local(source, base_dir):
            problems += check_local_file(trial, field, local_path(source, base_dir), kinds.get(field, PLAIN),
                                         template_fields(prompt) | template_fields(completion))
            continue
        if not local_path(source, base_dir).is_dir():
            problems += check_hub_dataset(field, source)
        split, split_field = (("train", "data.train") if field == "train"
                              else (trial.data.validation_split, "data.validation_split"))
        problems += check_split(field, source, split, split_field, base_dir)
    return problems


def check_local_file(trial: TrialConfig, field: str, path: Path, kind: str, plain_columns: set[str]) -> list[str]:
    if kind == PLAIN:
        return check_data_file(field, path, plain_columns)
    problems = check_data_file(field, path, *_conversation_columns(trial, kind))
    return problems or chat_checks.check_conversation_rows(field, path, kind, trial.data.messages, trial.data.train_on)


def _long_completions(path: Path, tokenizer: Any, trial: TrialConfig) -> list[tuple[str, int]]:
    """(place, tokens) of every row whose completion and end-of-text alone, after the tokenizer's
    own leading tokens (a BOS), exceed max_seq_length."""
    limit, completion = trial.data.max_seq_length, plain_templates(trial.data.prompt, trial.data.completion)[1]
    keep = len(leading_special_tokens(tokenizer))
    return [(place, n) for place, row in read_local_rows(path)
            if (n := keep + len(completion_ids(tokenizer, completion, row))) > limit]


def check_long_completions(field: str, path: Path, tokenizer: Any, trial: TrialConfig) -> list[str]:
    """A completion that alone exceeds max_seq_length is cut, and the model learns a truncated answer."""
    if not (long := _long_completions(path, tokenizer, trial)):
        return []
    shown = ", ".join(f"{place} ({n} tokens)" for place, n in long[:SHOWN_ROWS])
    more = f" and {len(long) - SHOWN_ROWS} more" if len(long) > SHOWN_ROWS else ""
    return [f"data.{field}: the completion of {shown}{more} of {path} is longer than data.max_seq_length "
            f"({trial.data.max_seq_length} tokens, end of text and the tokenizer's BOS included), so it would be "
            f"cut; raise data.max_seq_length to at least {max(n for _, n in long)} or shorten those completions"]


def check_template_for_rows(trial: TrialConfig, base_dir: Path, model_folder: Path) -> tuple[Any, list[str]]:
    """The model's tokenizer, and the problems of the chat template where one is needed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder, trust_remote_code=trial.model.trust_remote_code)
    template = chat.read_template(trial.data.chat_template, base_dir)
    return tokenizer, chat_checks.check_chat_template(trial, tokenizer, template, file_kinds(trial, base_dir))


def check_tokenized_rows(trial: TrialConfig, base_dir: Path, model_folder: Path) -> list[str]:
    """Rows against the model's tokenizer: the chat template where one is needed, conversations
    rendered and masked as training will, and answers that fit max_seq_length. Only local files are
    read (a hub dataset would have to be loaded); run after the file checks."""
    tokenizer, problems = check_template_for_rows(trial, base_dir, model_folder)
    if problems:
        return problems
    template = chat.read_template(trial.data.chat_template, base_dir)
    kinds = file_kinds(trial, base_dir)
    for field, kind in kinds.items():
        path = local_path(getattr(trial.data, field), base_dir)
        problems += (check_long_completions(field, path, tokenizer, trial) if kind == PLAIN
                     else chat_checks.check_renderings(field, path, kind, tokenizer, trial, template))
    return problems
