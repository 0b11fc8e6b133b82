"""Conversations rendered with the model's chat template, the loss on the assistant's turns.

A row's tokens are exactly `tokenizer.apply_chat_template(messages, tokenize=True)`. The loss mask
comes from the template itself. A template with `{% generation %}` markers says which tokens are
the assistant's, and transformers' `return_assistant_tokens_mask` gives them. Most templates have
none; then an assistant turn starts where the conversation before it ends, rendered with the
generation prompt (what the model is given when it is used), and ends where the conversation up to
and including that turn ends, so its end-of-turn token, as the template writes it, is trained on
and the model learns to stop. Those character spans become tokens through the fast tokenizer's
offsets, the way transformers turns markers into its mask.

A prefix rendered on its own is not always the start of the whole conversation (templates that
drop earlier turns' reasoning, or write the generation prompt differently from an assistant turn's
header): such a turn cannot be located, and its row is refused with the reason, never mis-masked.
Such a template with markers (TRL ships training copies of Qwen3's and others') trains every turn.

Taken from TRL (trl/data_utils.py `is_conversational`, `apply_chat_template`; the SFT trainer's
tokenize step): which rows are conversations (a `messages` list, or `prompt` and `completion` message
lists, each message a dict with a `role`), the prompt rendered with `add_generation_prompt=True`,
and the check that it is a prefix of the full rendering (TRL warns and trains on anyway).
From Axolotl (prompt_strategies/chat_template.py): every assistant turn trained by default, not
only the last (`roles_to_train: [assistant]`), each with its end-of-turn token (`train_on_eos:
turn`). Not taken: swapping in TRL's training copies of known templates on its own (a user can give
one as data.chat_template), and Axolotl's dummy-content diff, which guesses a turn's bounds and
allows a few tokens of slack.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, NamedTuple

from qsweep.config.paths import resolve_path

ASSISTANT = "assistant"
ALL_ASSISTANT, LAST_ASSISTANT = "all_assistant", "last_assistant"
IGNORE = -100  # the label of a token the loss skips (transformers' ignore_index)


class ChatRowError(ValueError):
    """A conversation that cannot be rendered or masked; the message says why and what to do."""


class Rendered(NamedTuple):
    input_ids: list[int]
    turns: list[tuple[int, int]]  # token [start, end) of each trained assistant turn, in order


def is_conversation(value: Any) -> bool:
    """A list of messages, each a dict with a role (as TRL's is_conversational tells them apart)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def read_template(chat_template: str | None, base_dir: Path) -> str | None:
    """The text of data.chat_template (a .jinja file relative to the sweep file); None when unset."""
    return resolve_path(chat_template, base_dir).read_text(encoding="utf-8") if chat_template else None


def use_template(tokenizer: Any, template: str | None) -> Any:
    """The tokenizer with data.chat_template in place of its own, so training, scoring (lm-eval
    reads tokenizer.chat_template) and the saved adapter's tokenizer all use the same one."""
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def template_in_effect(model_path: Path, trial: Any, base_dir: Path) -> str | None:
    """The chat template a trial renders and scores with: data.chat_template, else the model's own."""
    return read_template(trial.data.chat_template, base_dir) or _own_template(model_path, trial.model.trust_remote_code)


@functools.lru_cache(maxsize=8)
def _own_template(model_path: Path, trust_remote_code: bool) -> str | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code).chat_template


def trained_turns(messages: list[dict], first: int, train_on: str) -> list[int]:
    """Indices of the assistant messages the loss is on, from message `first` on (a conversational
    prompt/completion row trains its completion only)."""
    turns = [i for i in range(first, len(messages)) if messages[i].get("role") == ASSISTANT]
    return turns[-1:] if train_on == LAST_ASSISTANT else turns


def _text(tokenizer: Any, messages: list[dict], template: str | None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def turn_characters(tokenizer: Any, messages: list[dict], turns: list[int], template: str | None,
                    full: str) -> list[tuple[int, int]]:
    """Character [start, end) of each turn in `full`, the whole conversation's rendering."""
    spans = []
    for i in turns:
        if i == 0:
            raise ChatRowError("message 1 is an assistant turn with nothing before it, so where it starts cannot be "
                               "told; begin the conversation with a system or user message")
        before = _text(tokenizer, messages[:i], template, generation_prompt=True)
        through = _text(tokenizer, messages[: i + 1], template)
        if not full.startswith(before):
            raise ChatRowError(
                f"the chat template renders the messages before message {i + 1} (an assistant turn) with its "
                "generation prompt, what the model is given to answer, differently from the start of the whole "
                "conversation, so where that turn starts cannot be told; give a template whose generation prompt "
                "is how it writes an assistant turn's start (data.chat_template)")
        if not (full.startswith(through) and len(through) > len(before)):
            raise ChatRowError(
                f"the chat template renders the conversation up to message {i + 1} (an assistant turn) differently "
                "from the start of the whole conversation (templates that drop earlier turns' reasoning do this), "
                "so where that turn ends cannot be told; set data.train_on: last_assistant, or give a template "
                "that renders each turn the same way (data.chat_template)")
        spans.append((len(before), len(through)))
    return spans


def tokens_of(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token [start, end) of each character span: every token overlapping it, as transformers masks
    a `{% generation %}` span."""
    tokens = []
    for start, end in spans:
        inside = [k for k, (first, last) in enumerate(offsets) if last > start and first < end]
        tokens.append((inside[0], inside[-1] + 1))
    return tokens


def has_generation_markers(template: str) -> bool:
    """`{% generation %}` blocks (any whitespace control), as TRL's chat_template_utils tells them."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def marked_turns(mask: list[int], messages: list[dict], turns: list[int]) -> list[tuple[int, int]]:
    """Token spans of `turns` from transformers' assistant mask: one `{% generation %}` block per
    assistant message, in order."""
    blocks = [(k, k + len(run)) for k, run in ((m.start(), m.group()) for m in
                                                re.finditer("1+", "".join(str(bit) for bit in mask)))]
    assistants = [i for i, message in enumerate(messages) if message.get("role") == ASSISTANT]
    if len(blocks) != len(assistants):
        raise ChatRowError(f"the chat template's {{% generation %}} blocks ({len(blocks)}) are not one per assistant "
                           f"turn ({len(assistants)}); give a template that marks each assistant turn once")
    return [blocks[assistants.index(i)] for i in turns]


def render(tokenizer: Any, messages: list[dict], turns: list[int], template: str | None = None) -> Rendered:
    """The conversation's tokens (apply_chat_template's own) and the token spans of `turns`: from
    the template's `{% generation %}` markers where it has them (transformers' own mask), else from
    the rendered prefixes."""
    if not turns:
        raise ChatRowError("it has no assistant turn to train on; add one or remove the row")
    from jinja2 import TemplateError

    marked = has_generation_markers(tokenizer.get_chat_template(template))
    try:
        encoded = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=marked,
                                                tokenizer_kwargs={"return_offsets_mapping": True})
        if marked:
            return Rendered(list(encoded["input_ids"]), marked_turns(encoded["assistant_masks"], messages, turns))
        characters = turn_characters(tokenizer, messages, turns, template, _text(tokenizer, messages, template))
    except TemplateError as exc:  # the template's own raise_exception, e.g. roles that must alternate
        raise ChatRowError(f"the chat template refuses it ({exc}); fix the row or the template") from None
    return Rendered(list(encoded["input_ids"]), tokens_of(encoded["offset_mapping"], characters))


def labels_of(input_ids: list[int], turns: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE] * len(input_ids)
    for start, end in turns:
        labels[start:end] = input_ids[start:end]
    return labels


def fit(rendered: Rendered, max_length: int, keep: int) -> tuple[list[int], list[int]]:
    """input_ids and labels within max_length, whole assistant turns kept where they can be.

    A conversation that fits is left as rendered. A longer one keeps its start (system prompt and the
    turns that fit whole, as TRL's keep-start truncation, but at a turn's end, never inside it); when
    not even the first trained turn fits that way, its context is cut from the left (the first `keep`
    tokens, the tokenizer's BOS, stay), and a turn longer than max_length alone keeps its start
    (`qsweep validate` reports those rows).
    """
    ids, turns = rendered
    labels = labels_of(ids, turns)
    if len(ids) <= max_length:
        return ids, labels
    whole = [turn for turn in turns if turn[1] <= max_length]
    if whole:
        cut = whole[-1][1]
        return ids[:cut], labels[:cut]
    start, end = turns[0]
    room = max_length - keep
    stop = min(end, start + room)
    return ids[:keep] + ids[stop - room:stop], [IGNORE] * keep + labels[stop - room:stop]
