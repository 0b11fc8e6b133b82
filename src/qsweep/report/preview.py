"""`qsweep preview`: the training rows as the model sees them, with the trained-on tokens marked,
and how long the rows are, before anything trains (as Axolotl's `preprocess --debug`).

The rows are tokenized by train.data exactly as a trial tokenizes them, so what is shown is what
is trained on: the tokens, the labels (-100 where no loss) and each row's length before truncation.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.text import Text

from qsweep.config.schema import TrialConfig
from qsweep.train import chat
from qsweep.train.data import FULL_LENGTH, TRAIN_SPLIT, encode_rows, load_rows

# Marks the trained-on text where there is no colour (a pipe, a file, CI).
OPEN, CLOSE = "[[", "]]"
TRAINED_STYLE, CONTEXT_STYLE = "bold green", "dim"


@dataclass
class Row:
    number: int
    input_ids: list[int]
    labels: list[int]
    full_length: int
    segments: list[tuple[str, bool]]  # decoded text of each run of tokens, and whether it is trained on


@dataclass
class Preview:
    rows: list[Row]
    lengths: list[int]  # every training row's length in tokens before truncation
    max_length: int


def load_tokenizer(trial: TrialConfig, base_dir: Path, model_folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder, trust_remote_code=trial.model.trust_remote_code)
    return chat.use_template(tokenizer, chat.read_template(trial.data.chat_template, base_dir))


def segments(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Runs of tokens that are all trained on or all not, each decoded (special tokens shown)."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(input_ids, labels):
        trained = label != chat.IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [(tokenizer.decode(ids), trained) for ids, trained in runs]


def build_preview(trial: TrialConfig, base_dir: Path, model_folder: Path, count: int) -> Preview:
    """The first `count` training rows, tokenized as a trial does, and every row's full length.
    Raises chat.ChatRowError for a conversation that cannot be masked."""
    data = trial.data
    tokenizer = load_tokenizer(trial, base_dir, model_folder)
    encoded = encode_rows(load_rows(data.train, base_dir, TRAIN_SPLIT), tokenizer, data.prompt, data.completion,
                          data.max_seq_length, messages=data.messages, train_on=data.train_on,
                          chat_template=chat.read_template(data.chat_template, base_dir))
    shown = encoded.select(range(min(count, len(encoded))))
    rows = [Row(n, item["input_ids"], item["labels"], item[FULL_LENGTH],
                segments(tokenizer, item["input_ids"], item["labels"])) for n, item in enumerate(shown, 1)]
    return Preview(rows, list(encoded[FULL_LENGTH]), data.max_seq_length)


def json_lines(preview: Preview) -> str:
    """One JSON object per row: its input_ids and labels (-100 where no loss)."""
    return "".join(json.dumps({"input_ids": r.input_ids, "labels": r.labels}) + "\n" for r in preview.rows)


def row_heading(row: Row, max_length: int) -> str:
    trained = sum(label != chat.IGNORE for label in row.labels)
    cut = f", cut from {row.full_length}" if row.full_length > max_length else ""
    return f"row {row.number}: {len(row.input_ids)} tokens{cut}, {trained} trained on"


def row_text(row: Row, colour: bool) -> Text:
    text = Text()
    for piece, trained in row.segments:
        if colour:
            text.append(piece, style=TRAINED_STYLE if trained else CONTEXT_STYLE)
        else:
            text.append(f"{OPEN}{piece}{CLOSE}" if trained else piece)
    return text


def length_summary(preview: Preview) -> str:
    """The token-length distribution of every training row, before truncation, and how many are cut."""
    lengths = sorted(preview.lengths)
    if not lengths:
        return "no training rows"
    cut = sum(n > preview.max_length for n in lengths)
    p90, p99 = (lengths[math.ceil(q * len(lengths)) - 1] for q in (0.9, 0.99))  # nearest rank
    return (f"{len(lengths)} training rows, tokens before truncation: min {lengths[0]}, median "
            f"{statistics.median(lengths):g}, p90 {p90}, p99 {p99}, max {lengths[-1]}; {cut} "
            f"({100 * cut / len(lengths):.1f}%) longer than data.max_seq_length ({preview.max_length}) and cut")


def as_text(preview: Preview, colour: bool) -> Group:
    legend = (Text.assemble(("trained on", TRAINED_STYLE), " / ", ("context (no loss)", CONTEXT_STYLE)) if colour
              else Text(f"trained-on text is between {OPEN} and {CLOSE}; the rest is context (no loss)"))
    parts: list[Any] = [legend]
    for row in preview.rows:
        parts += [Text(""), Text(row_heading(row, preview.max_length), style="bold" if colour else ""),
                  row_text(row, colour)]
    return Group(*parts, Text(""), Text(length_summary(preview)))
