"""Training data: read rows, render them, tokenize with the loss on what the model must learn.

Rows come from a local jsonl/json/csv file or a hub dataset id (through `datasets`). They are of
one of three kinds, told apart by the sweep and the first row (row_kind): plain rows rendered with
the Python format strings data.prompt + data.completion (the loss on the completion), or
conversations (a messages column, or TRL's conversational prompt + completion) rendered with the
model's chat template (train.chat; the loss on the assistant turns). The hash of the raw files (or
the dataset id + revision) is logged so every score is tied to its data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import string
from pathlib import Path
from typing import Any, Iterator

from qsweep.config.paths import resolve_path
from qsweep.config.schema import DataConfig
from qsweep.train import chat

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}
# A local file has one split; a hub dataset's training rows are in this one.
TRAIN_SPLIT = "train"
PLAIN, MESSAGES, PROMPT_COMPLETION = "plain", "messages", "prompt_completion"
# What data.prompt / data.completion mean when not set, for plain rows.
DEFAULT_PROMPT, DEFAULT_COMPLETION = "{prompt}", " {completion}"
DEFAULT_MESSAGES = "messages"
# The untruncated length of each row, beside its tokens: for `qsweep preview`'s distribution.
FULL_LENGTH = "full_length"


class DataFileError(ValueError):
    """A local data file that `datasets` would fail to read, with the place and the fix."""


def template_fields(template: str) -> set[str]:
    return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(template) if field}


def is_local(source: str, base_dir: Path) -> bool:
    """A local data file (a folder is a dataset laid out as on the hub, read by `datasets` like one)."""
    return Path(source).suffix in LOCAL_FORMATS or (base_dir / source).is_file()


def dataset_folder(source: str, base_dir: Path) -> Path | None:
    """The folder of a dataset in the hub's layout: a folder next to the sweep file, or a hub
    dataset already in the local hub cache; None when neither (nothing is downloaded here)."""
    local = local_path(source, base_dir)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: the caller reports what it can
        return None


def split_names(folder: Path) -> list[str] | None:
    """The splits `datasets` finds in a dataset folder by its file names; None when it cannot tell."""
    from datasets.data_files import get_data_patterns

    try:
        return [str(split) for split in get_data_patterns(str(folder))]
    except Exception:  # noqa: BLE001 - a loading script or an odd layout: only loading can tell
        return None


def local_path(source: str, base_dir: Path) -> Path:
    return resolve_path(source, base_dir)


def load_rows(source: str, base_dir: Path, split: str = TRAIN_SPLIT) -> Any:
    """A `datasets.Dataset` of raw rows: a local file's only split, or the named split of a hub dataset."""
    from datasets import load_dataset

    if is_local(source, base_dir):
        path = local_path(source, base_dir)
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    folder = local_path(source, base_dir)
    return load_dataset(str(folder) if folder.is_dir() else source, split=split)


Rows = Iterator[tuple[str, dict[str, Any]]]


def _jsonl_rows(path: Path) -> Rows:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue  # datasets skips blank lines too
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataFileError(f"line {number} is not a JSON object; each line must be one "
                                    "{\"column\": value} row")
            yield f"line {number}", row


def _json_rows(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFileError(f"line {exc.lineno} is not valid JSON ({exc.msg}); fix it, or write one row per line "
                            "in a .jsonl file") from None
    if isinstance(data, dict):
        yield "row 1", data  # datasets reads a top-level object as one row, its lists as list values
    elif isinstance(data, list):
        for index, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise DataFileError(f"item {index} is not a JSON object; give a list of {{\"column\": value}} rows")
            yield f"row {index}", row
    else:
        raise DataFileError("must hold a list of {\"column\": value} rows")


def _csv_rows(path: Path) -> Rows:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            return
        for row in reader:
            if not row:
                continue  # blank lines are skipped when read
            if len(row) != len(header):
                raise DataFileError(f"line {reader.line_num} has {len(row)} fields but the header has {len(header)}; "
                                    "quote values that contain commas")
            # datasets keeps header names as written, spaces included
            yield f"line {reader.line_num}", dict(zip(header, row))


READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}


def read_local_rows(path: Path) -> Rows:
    """(place, row) of every row of a local file, read with json/csv: the preflight's reader.

    Training reads through `datasets` (load_rows), whose pyarrow errors name a 0-based row of a bad
    line and no line of a ragged csv; this reader names the line a user has to fix. CSV values stay
    text here (datasets types them), which changes no column name and no row count.
    Raises DataFileError, UnicodeDecodeError or OSError.
    """
    return READERS[path.suffix](path)


def row_kind(row: dict[str, Any], prompt: str | None = None, completion: str | None = None,
             messages: str | None = None) -> str:
    """PLAIN, MESSAGES or PROMPT_COMPLETION: the sweep says so (data.messages, or a format string in
    data.prompt / data.completion), else the first row does (a `messages` conversation, or `prompt`
    and `completion` message lists); anything else is plain rows with the default format strings."""
    if messages is not None:
        return MESSAGES
    if prompt is not None or completion is not None:
        return PLAIN
    if chat.is_conversation(row.get(DEFAULT_MESSAGES)):
        return MESSAGES
    if chat.is_conversation(row.get("prompt")) and chat.is_conversation(row.get("completion")):
        return PROMPT_COMPLETION
    return PLAIN


def data_kind(data: DataConfig, row: dict[str, Any]) -> str:
    return row_kind(row, data.prompt, data.completion, data.messages)


def plain_templates(prompt: str | None, completion: str | None) -> tuple[str, str]:
    """data.prompt and data.completion with their defaults filled in."""
    return (DEFAULT_PROMPT if prompt is None else prompt, DEFAULT_COMPLETION if completion is None else completion)


def conversation(row: dict[str, Any], kind: str, column: str | None) -> tuple[list[dict], int]:
    """The row's messages and the index of the first one the loss may be on."""
    if kind == PROMPT_COMPLETION:
        return row["prompt"] + row["completion"], len(row["prompt"])
    return row[column or DEFAULT_MESSAGES], 0


def tokenized_sets(data: DataConfig, base_dir: Path, tokenizer: Any) -> tuple[Any, Any | None]:
    """The tokenized training set and, if the sweep has one, the validation set from its own split."""
    template = chat.read_template(data.chat_template, base_dir)

    def encode(source: str, split: str) -> Any:
        rows = load_rows(source, base_dir, split)
        return tokenize_rows(rows, tokenizer, data.prompt, data.completion, data.max_seq_length,
                             messages=data.messages, train_on=data.train_on, chat_template=template)

    return encode(data.train, TRAIN_SPLIT), encode(data.validation, data.validation_split) if data.validation else None


def data_hash(sources: list[str | None], base_dir: Path) -> str:
    digest = hashlib.sha256()
    for source in sources:
        if source is None:
            continue
        path = local_path(source, base_dir)
        if is_local(source, base_dir):
            digest.update(path.read_bytes())
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
        else:
            digest.update(source.encode())
    return digest.hexdigest()


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer itself puts before a text: a BOS for Llama 3 or Gemma, none for
    GPT-2 or Qwen (read from its own output, so a post-processor's choice is followed)."""
    probe = "Hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    starts = [k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain]
    return full[:starts[0]] if starts else []


def completion_ids(tokenizer: Any, completion: str, row: dict) -> list[int]:
    """The tokens the loss is on: the rendered completion and the end-of-text token."""
    return tokenizer(completion.format(**row), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_plain(row: dict, tokenizer: Any, prompt: str, completion: str, max_length: int,
                 prefix: list[int]) -> dict:
    """The tokenizer's own leading tokens (its BOS, if it adds one), the prompt, the completion and
    end of text; labels -100 but on the completion.

    A row longer than max_length loses the start of its prompt (the BOS stays), never its
    completion: cutting the end would leave every label -100 and a NaN loss. A completion longer
    than max_length alone keeps its first tokens and no prompt (`qsweep validate` reports such rows).
    """
    prompt_ids = tokenizer(prompt.format(**row), add_special_tokens=False)["input_ids"]
    answer_ids = completion_ids(tokenizer, completion, row)
    full_length = len(prefix) + len(prompt_ids) + len(answer_ids)
    room = max_length - len(prefix)
    answer_ids = answer_ids[:room]
    kept = room - len(answer_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - kept:] if kept < len(prompt_ids) else prompt_ids
    ids = prefix + prompt_ids + answer_ids
    labels = [chat.IGNORE] * (len(prefix) + len(prompt_ids)) + answer_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, FULL_LENGTH: full_length}


def encode_conversation(messages: list[dict], first: int, tokenizer: Any, train_on: str, template: str | None,
                        max_length: int, prefix: list[int]) -> dict:
    rendered = chat.render(tokenizer, messages, chat.trained_turns(messages, first, train_on), template)
    keep = len(prefix) if rendered.input_ids[:len(prefix)] == prefix else 0
    ids, labels = chat.fit(rendered, max_length, keep)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            FULL_LENGTH: len(rendered.input_ids)}


def encode_rows(rows: Any, tokenizer: Any, prompt: str | None = None, completion: str | None = None,
                max_length: int = 256, *, messages: str | None = None, train_on: str = chat.ALL_ASSISTANT,
                chat_template: str | None = None) -> Any:
    """tokenize_rows with FULL_LENGTH, each row's length before truncation, beside its tokens."""
    kind = row_kind(rows[0], prompt, completion, messages) if len(rows) else PLAIN
    prefix = leading_special_tokens(tokenizer)
    plain_prompt, plain_completion = plain_templates(prompt, completion)

    def encode(row: dict, index: int) -> dict:
        if kind == PLAIN:
            return encode_plain(row, tokenizer, plain_prompt, plain_completion, max_length, prefix)
        try:
            turns, first = conversation(row, kind, messages)
            return encode_conversation(turns, first, tokenizer, train_on, chat_template, max_length, prefix)
        except chat.ChatRowError as exc:
            raise chat.ChatRowError(f"row {index + 1}: {exc}") from None

    return rows.map(encode, with_indices=True, remove_columns=rows.column_names)


def tokenize_rows(rows: Any, tokenizer: Any, prompt: str | None = None, completion: str | None = None,
                  max_length: int = 256, *, messages: str | None = None, train_on: str = chat.ALL_ASSISTANT,
                  chat_template: str | None = None) -> Any:
    """input_ids, attention_mask and labels (-100 where no loss) of every row, at most max_length
    tokens: plain rows rendered with the format strings `prompt` / `completion` (None: the defaults),
    conversations with the chat template (`chat_template`, a template's text, replaces the
    tokenizer's) and the loss on their assistant turns (`train_on`). The arguments mirror DataConfig."""
    encoded = encode_rows(rows, tokenizer, prompt, completion, max_length, messages=messages, train_on=train_on,
                          chat_template=chat_template)
    return encoded.remove_columns(FULL_LENGTH)
