"""Training data: template fields and tokenization with the loss on the completion only."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsweep.train.data import template_fields, tokenize_rows

PROMPT = "Q: {question}\nA:"
COMPLETION = " {answer}"


@pytest.mark.parametrize(
    "template, fields",
    [
        ("{prompt}", {"prompt"}),
        (" {completion}", {"completion"}),
        ("Q: {question}\nA:", {"question"}),
        ("{a} and {b} and {a}", {"a", "b"}),
        ("{row.text} / {choices[0]} / {x!r:>10}", {"row", "choices", "x"}),
        ("literal {{braces}} only", set()),
        ("no fields at all", set()),
        ("", set()),
    ],
)
def test_template_fields(template, fields):
    assert template_fields(template) == fields


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def rows():
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"question": "What is the zorble of 3?", "answer": "11", "x": 3},
            {"question": "What is the zorble of 12?", "answer": "38", "x": 12},
        ]
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_rows_masks_the_prompt_and_keeps_completion_and_eos(tokenizer, rows):
    encoded = tokenize_rows(rows, tokenizer, PROMPT, COMPLETION, max_length=256)
    assert set(encoded.column_names) == {"input_ids", "attention_mask", "labels"}
    assert len(encoded) == 2
    for row, item in zip(rows, encoded):
        prompt_ids = _ids(tokenizer, PROMPT.format(**row))
        answer_ids = _ids(tokenizer, COMPLETION.format(**row)) + [tokenizer.eos_token_id]
        assert prompt_ids and len(answer_ids) >= 2
        assert item["input_ids"] == prompt_ids + answer_ids
        assert item["labels"] == [-100] * len(prompt_ids) + answer_ids
        assert item["attention_mask"] == [1] * len(item["input_ids"])
        assert item["input_ids"][-1] == tokenizer.eos_token_id == item["labels"][-1]
        # The learned part decodes back to the completion.
        learned = [t for t in item["labels"] if t != -100]
        assert tokenizer.decode(learned, skip_special_tokens=True) == COMPLETION.format(**row)
        assert tokenizer.decode(item["input_ids"][: len(prompt_ids)]) == PROMPT.format(**row)


def test_tokenize_rows_uses_no_special_tokens_before_the_prompt(tokenizer, rows):
    item = tokenize_rows(rows, tokenizer, PROMPT, COMPLETION, max_length=256)[0]
    assert item["input_ids"][0] != tokenizer.bos_token_id
    assert item["input_ids"].count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("max_length", [4, 12, 13])
def test_tokenize_rows_truncates_to_max_length(tokenizer, rows, max_length):
    full = tokenize_rows(rows, tokenizer, PROMPT, COMPLETION, max_length=10_000)
    short = tokenize_rows(rows, tokenizer, PROMPT, COMPLETION, max_length=max_length)
    for whole, item in zip(full, short):
        assert len(whole["input_ids"]) > max_length
        assert len(item["input_ids"]) == len(item["labels"]) == len(item["attention_mask"]) == max_length
        assert item["input_ids"] == whole["input_ids"][:max_length]
        assert item["labels"] == whole["labels"][:max_length]


def test_tokenize_rows_long_prompt_leaves_no_completion_when_truncated(tokenizer, rows):
    prompt_len = len(_ids(tokenizer, PROMPT.format(**rows[0])))
    item = tokenize_rows(rows, tokenizer, PROMPT, COMPLETION, max_length=prompt_len)[0]
    assert item["labels"] == [-100] * prompt_len


def test_tokenize_rows_drops_raw_columns_and_uses_any_column(tokenizer, rows):
    encoded = tokenize_rows(rows, tokenizer, "x={x}:", " {answer}", max_length=64)
    assert "question" not in encoded.column_names and "x" not in encoded.column_names
    item = encoded[1]
    prompt_ids = _ids(tokenizer, "x=12:")
    assert item["input_ids"][: len(prompt_ids)] == prompt_ids
    assert item["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)


def test_tokenize_rows_missing_column_is_a_key_error(tokenizer, rows):
    with pytest.raises(KeyError, match="context"):
        tokenize_rows(rows, tokenizer, "{context}", COMPLETION, max_length=64)
