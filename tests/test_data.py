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


@pytest.fixture(scope="module")
def adds_bos():
    """A Llama 3 / Gemma-like tokenizer: its post-processor puts a BOS before every text."""
    from chat_tokenizers import llama3

    tokenizer = llama3()
    assert tokenizer("Q")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


@pytest.mark.parametrize("which", ["adds_bos", "no_bos"])
def test_the_prompt_starts_as_the_tokenizer_itself_starts_a_text(which, tokenizer, adds_bos, rows):
    """Issue 21 item 2: the prompt was tokenized without special tokens, so a model whose tokenizer
    adds a BOS (Llama 3, Gemma) trained without it."""
    tok = adds_bos if which == "adds_bos" else tokenizer
    for row, item in zip(rows, tokenize_rows(rows, tok, PROMPT, COMPLETION, max_length=256)):
        own = tok(PROMPT.format(**row))["input_ids"]  # the tokenizer's own output, special tokens included
        assert (own[0] == tok.bos_token_id) == (which == "adds_bos")
        assert item["input_ids"][:len(own)] == own
        assert item["labels"][:len(own)] == [-100] * len(own)
        assert item["input_ids"][len(own):] == _ids(tok, COMPLETION.format(**row)) + [tok.eos_token_id]


def test_a_cut_prompt_keeps_the_bos(adds_bos, rows):
    answer = _ids(adds_bos, COMPLETION.format(**rows[0])) + [adds_bos.eos_token_id]
    prompt = _ids(adds_bos, PROMPT.format(**rows[0]))
    item = tokenize_rows(rows, adds_bos, PROMPT, COMPLETION, max_length=len(answer) + 3)[0]
    assert item["input_ids"] == [adds_bos.bos_token_id] + prompt[-2:] + answer


@pytest.mark.parametrize("max_length", [4, 12, 13])
def test_tokenize_rows_cuts_the_prompt_from_the_left_and_keeps_the_completion(tokenizer, rows, max_length):
    encoded = tokenize_rows(rows, tokenizer, PROMPT, COMPLETION, max_length=max_length)
    assert len(encoded) == len(rows) == 2
    for row, item in zip(rows, encoded):
        prompt_ids = _ids(tokenizer, PROMPT.format(**row))
        answer_ids = _ids(tokenizer, COMPLETION.format(**row)) + [tokenizer.eos_token_id]
        assert len(prompt_ids) + len(answer_ids) > max_length > len(answer_ids)
        kept = max_length - len(answer_ids)
        assert len(item["input_ids"]) == len(item["labels"]) == len(item["attention_mask"]) == max_length
        assert item["input_ids"] == prompt_ids[-kept:] + answer_ids
        assert item["labels"] == [-100] * kept + answer_ids


def test_a_prompt_reaching_max_length_still_leaves_the_whole_completion_learned(tokenizer, rows):
    """Defect 2: the prompt alone filled max_length, every label was -100 and the loss NaN."""
    prompt_len = len(_ids(tokenizer, PROMPT.format(**rows[0])))
    item = tokenize_rows(rows, tokenizer, PROMPT, COMPLETION, max_length=prompt_len)[0]
    learned = [t for t in item["labels"] if t != -100]
    assert tokenizer.decode(learned, skip_special_tokens=True) == COMPLETION.format(**rows[0])
    assert len(item["input_ids"]) == prompt_len


def test_a_completion_longer_than_max_length_keeps_its_start_and_no_prompt(tokenizer, rows):
    answer_ids = _ids(tokenizer, COMPLETION.format(**rows[1])) + [tokenizer.eos_token_id]
    item = tokenize_rows(rows, tokenizer, PROMPT, COMPLETION, max_length=len(answer_ids) - 1)[1]
    assert item["input_ids"] == item["labels"] == answer_ids[:-1]


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


def test_the_validation_set_comes_from_the_validation_split(tmp_path: Path, tokenizer):
    """Defect 1: a dataset's `validation` was read from its train split."""
    from qsweep.config.schema import DataConfig
    from qsweep.train.data import tokenized_sets

    folder = tmp_path / "zorble_ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"question": "What is the zorble of 1?", "answer": "5"}\n')
    (folder / "validation.jsonl").write_text('{"question": "What is the zorble of 7?", "answer": "23"}\n'
                                             '{"question": "What is the zorble of 8?", "answer": "26"}\n')
    data = DataConfig(train="zorble_ds", validation="zorble_ds", prompt=PROMPT, completion=COMPLETION)
    train_set, eval_set = tokenized_sets(data, tmp_path, tokenizer)
    decoded = [tokenizer.decode(item["input_ids"], skip_special_tokens=True) for item in eval_set]
    assert decoded == ["Q: What is the zorble of 7?\nA: 23", "Q: What is the zorble of 8?\nA: 26"]
    assert len(train_set) == 1


def test_read_local_rows_yields_the_rows_datasets_reads(tmp_path: Path):
    from qsweep.train.data import load_rows, read_local_rows

    lines = ['{"q": "a", "n": 1}', "", '{"q": "b", "n": 2}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "d.json").write_text('[{"q": "a", "n": 1}, {"q": "b", "n": 2}]')
    (tmp_path / "columns.json").write_text('{"q": ["a", "b"], "n": [1, 2]}')
    for name in ("d.jsonl", "d.json", "columns.json"):
        mine = [row for _, row in read_local_rows(tmp_path / name)]
        assert mine == load_rows(name, tmp_path).to_list()
    assert [row for _, row in read_local_rows(tmp_path / "d.jsonl")] == [{"q": "a", "n": 1}, {"q": "b", "n": 2}]
    assert [place for place, _ in read_local_rows(tmp_path / "d.jsonl")] == ["line 1", "line 3"]
