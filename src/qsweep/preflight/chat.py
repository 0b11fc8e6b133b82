"""Conversations and chat templates: rows that are conversations with an assistant turn to train
on, a chat template to render them (and to score with, evaluation.apply_chat_template) that the
model has or data.chat_template gives, and every local row rendered and masked as training will:
a turn whose place the template does not let us find, or one longer than data.max_seq_length alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qsweep.config.paths import resolve_path
from qsweep.config.schema import TrialConfig
from qsweep.train import chat
from qsweep.train.data import (
    PLAIN,
    PROMPT_COMPLETION,
    conversation,
    leading_special_tokens,
    read_local_rows,
)

SHOWN_ROWS = 3


def listed(places: list[str]) -> str:
    more = f" and {len(places) - SHOWN_ROWS} more" if len(places) > SHOWN_ROWS else ""
    return ", ".join(places[:SHOWN_ROWS]) + more


def check_template_file(trial: TrialConfig, base_dir: Path) -> list[str]:
    """data.chat_template: a readable file (whether it renders is checked with the tokenizer)."""
    if trial.data.chat_template is None:
        return []
    path = resolve_path(trial.data.chat_template, base_dir)
    if not path.is_file():
        return [f"data.chat_template: file {path} does not exist; fix the path (relative to the sweep file)"]
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"data.chat_template: cannot read {path} ({exc}); save it as UTF-8 text"]
    return []


def _shape_problem(row: dict[str, Any], kind: str, column: str | None) -> str | None:
    """Why a row is not a conversation of the kind the first row set, or None."""
    names = ("prompt", "completion") if kind == PROMPT_COMPLETION else (column or "messages",)
    for name in names:
        value = row.get(name)
        if not chat.is_conversation(value):
            return f"its {name!r} is not a list of {{role, content}} messages"
        # An assistant message that calls tools may have no content (OpenAI's and TRL's format).
        if bad := [str(n) for n, m in enumerate(value, 1) if not isinstance(m.get("role"), str)
                   or not (isinstance(m.get("content"), str) or m.get("tool_calls"))]:
            return f"message(s) {', '.join(bad)} of its {name!r} lack a text role or content"
    return None


def check_conversation_rows(field: str, path: Path, kind: str, column: str | None, train_on: str) -> list[str]:
    """Every row a conversation of the first row's kind, with an assistant turn to train on."""
    malformed, untrained = [], []
    for place, row in read_local_rows(path):
        if problem := _shape_problem(row, kind, column):
            malformed.append(f"{place} ({problem})")
            continue
        messages, first = conversation(row, kind, column)
        if not chat.trained_turns(messages, first, train_on):
            untrained.append(place)
    problems = []
    if malformed:
        problems.append(f"data.{field}: {listed(malformed)} of {path} are not conversations as the first row is; "
                        "give every row the same columns")
    if untrained:
        part = "completion" if kind == PROMPT_COMPLETION else "conversation"
        problems.append(f"data.{field}: the {part} of {listed(untrained)} of {path} has no assistant turn, so "
                        "nothing would be learned from it; add the assistant's answer or remove the row")
    return problems


def check_renderings(field: str, path: Path, kind: str, tokenizer: Any, trial: TrialConfig,
                     template: str | None) -> list[str]:
    """Each row rendered and masked as training will: turns the template does not let us locate,
    and trained turns longer than max_seq_length alone (they would be cut mid-answer)."""
    data, limit = trial.data, trial.data.max_seq_length
    prefix = leading_special_tokens(tokenizer)
    refused: dict[str, list[str]] = {}
    long: list[tuple[str, int]] = []
    for place, row in read_local_rows(path):
        messages, first = conversation(row, kind, data.messages)
        try:
            rendered = chat.render(tokenizer, messages, chat.trained_turns(messages, first, data.train_on), template)
        except chat.ChatRowError as exc:
            refused.setdefault(str(exc), []).append(place)
            continue
        keep = len(prefix) if rendered.input_ids[:len(prefix)] == prefix else 0
        if longest := max((end - start + keep for start, end in rendered.turns if end - start + keep > limit),
                          default=0):
            long.append((place, longest))
    problems = [f"data.{field}: {listed(places)} of {path}: {reason}" for reason, places in refused.items()]
    if long:
        problems.append(
            f"data.{field}: an assistant turn of {listed([f'{p} ({n} tokens)' for p, n in long])} of {path} is "
            f"longer than data.max_seq_length ({limit} tokens, its end-of-turn token included), so it would be cut; "
            f"raise data.max_seq_length to at least {max(n for _, n in long)} or shorten those answers")
    return problems


def check_chat_template(trial: TrialConfig, tokenizer: Any, template: str | None, kinds: dict[str, str]) -> list[str]:
    """A template to render conversations and to score with (the model's own or data.chat_template)
    that renders a question, used where it is needed and only there. `kinds`: each local file's row kind."""
    from jinja2 import TemplateError

    users = ([f"data.{field} holds conversations" for field, kind in kinds.items() if kind != PLAIN]
             + (["evaluation.apply_chat_template is on"] if trial.evaluation.apply_chat_template else []))
    if template is None and users and not tokenizer.chat_template:
        return [f"data.chat_template: {' and '.join(users)}, but the model has no chat template; set "
                "data.chat_template to a .jinja file holding one (the template of the model it was tuned from)"]
    if template is not None and not users and "train" in kinds:
        return ["data.chat_template: the rows are plain prompt/completion rows and evaluation.apply_chat_template "
                "is off, so the template would not be used; remove it, or turn evaluation.apply_chat_template on"]
    if template is not None:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "2 + 2?"}], chat_template=template,
                                          tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            return [f"data.chat_template: the template does not render a one-question conversation ({exc}); fix it "
                    "(the model's own chat_template in its tokenizer_config.json shows the shape)"]
    if users and not getattr(tokenizer, "is_fast", True):
        return ["model.name: its tokenizer is not a fast (tokenizers) one, and locating assistant turns needs its "
                "offsets; use a model whose folder has a tokenizer.json"]
    return []
