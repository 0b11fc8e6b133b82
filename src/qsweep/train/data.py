"""Training data: read rows, render prompt + completion, tokenize with the loss on the completion.

Rows come from a local jsonl/json/csv file or a hub dataset id (through `datasets`). The hash of
the raw files (or the dataset id + revision) is logged so every score is tied to its data.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path
from typing import Any

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


def template_fields(template: str) -> set[str]:
    return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(template) if field}


def is_local(source: str, base_dir: Path) -> bool:
    return Path(source).suffix in LOCAL_FORMATS or (base_dir / source).exists()


def local_path(source: str, base_dir: Path) -> Path:
    path = Path(source).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def load_rows(source: str, base_dir: Path, split: str = "train") -> Any:
    """A `datasets.Dataset` of raw rows."""
    from datasets import load_dataset

    if is_local(source, base_dir):
        path = local_path(source, base_dir)
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    return load_dataset(source, split=split)


def data_hash(sources: list[str | None], base_dir: Path) -> str:
    digest = hashlib.sha256()
    for source in sources:
        if source is None:
            continue
        if is_local(source, base_dir):
            digest.update(local_path(source, base_dir).read_bytes())
        else:
            digest.update(source.encode())
    return digest.hexdigest()


def tokenize_rows(rows: Any, tokenizer: Any, prompt: str, completion: str, max_length: int) -> Any:
    """input_ids + labels, with prompt tokens masked (-100) so only the completion is learned."""

    def encode(row: dict) -> dict:
        prompt_ids = tokenizer(prompt.format(**row), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(completion.format(**row), add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + [tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return rows.map(encode, remove_columns=rows.column_names)

