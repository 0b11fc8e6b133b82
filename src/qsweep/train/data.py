"""Training data: read rows, render prompt + completion, tokenize with the loss on the completion.

Rows come from a local jsonl/json/csv file or a hub dataset id (through `datasets`). The hash of
the raw files (or the dataset id + revision) is logged so every score is tied to its data.
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

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}
# A local file has one split; a hub dataset's training rows are in this one.
TRAIN_SPLIT = "train"


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


def tokenized_sets(data: DataConfig, base_dir: Path, tokenizer: Any) -> tuple[Any, Any | None]:
    """The tokenized training set and, if the sweep has one, the validation set from its own split."""

    def encode(source: str, split: str) -> Any:
        rows = load_rows(source, base_dir, split)
        return tokenize_rows(rows, tokenizer, data.prompt, data.completion, data.max_seq_length)

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


def completion_ids(tokenizer: Any, completion: str, row: dict) -> list[int]:
    """The tokens the loss is on: the rendered completion and the end-of-text token."""
    return tokenizer(completion.format(**row), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_rows(rows: Any, tokenizer: Any, prompt: str, completion: str, max_length: int) -> Any:
    """input_ids + labels, with prompt tokens masked (-100) so only the completion is learned.

    A row longer than max_length loses the start of its prompt, never its completion: cutting the
    end would leave every label -100 and a NaN loss. A completion longer than max_length alone
    keeps its first max_length tokens and no prompt (`qsweep validate` reports such rows).
    """

    def encode(row: dict) -> dict:
        prompt_ids = tokenizer(prompt.format(**row), add_special_tokens=False)["input_ids"]
        answer_ids = completion_ids(tokenizer, completion, row)[:max_length]
        room = max_length - len(answer_ids)
        prompt_ids = prompt_ids[-room:] if room else []
        ids = prompt_ids + answer_ids
        labels = [-100] * len(prompt_ids) + answer_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return rows.map(encode, remove_columns=rows.column_names)

