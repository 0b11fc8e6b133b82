"""tracking.flatten and is_secret: nested configs become MLflow params, secrets never do."""

from __future__ import annotations

import pytest

from qsweep.config.schema import SweepConfig
from qsweep.tracking import flatten, is_secret


def test_flatten_nested_dicts():
    assert flatten({"a": {"b": {"c": 1}, "d": "x"}, "e": None, "f": 2.5, "g": True}) == {
        "a.b.c": 1,
        "a.d": "x",
        "e": None,
        "f": 2.5,
        "g": True,
    }


def test_flatten_scalar_lists_are_joined():
    assert flatten({"tasks": ["zorble", "hellaswag"], "ids": (1, 2, 3)}) == {
        "tasks": "zorble,hellaswag",
        "ids": "1,2,3",
    }


def test_flatten_lists_of_dicts_and_lists_are_indexed():
    data = {
        "baselines": [{"lora.r": 16, "nested": {"x": 1}}, {"lora.r": 8}],
        "grid": [[1, 2], [3]],
        "mixed": [1, {"a": 2}],
    }
    assert flatten(data) == {
        "baselines.0.lora.r": 16,
        "baselines.0.nested.x": 1,
        "baselines.1.lora.r": 8,
        "grid.0": "1,2",
        "grid.1": "3",
        "mixed.0": 1,
        "mixed.1.a": 2,
    }


def test_flatten_with_prefix_and_non_string_keys():
    assert flatten({1: {"b": 2}}, prefix="p") == {"p.1.b": 2}


def test_flatten_drops_secrets_at_any_depth():
    data = {
        "hf_token": "hf_abc",
        "model": {"name": "m", "api_key": "k", "tokenizer_name": "tok"},
        "aws": {"aws_secret_access_key": "s", "region": "eu"},
        "db": [{"password": "p", "user": "u"}],
        "credentials": {"user": "u", "anything": "x"},
        "generation": {"max_tokens": 64},
    }
    flat = flatten(data)
    assert flat == {
        "model.name": "m",
        "model.tokenizer_name": "tok",
        "aws.region": "eu",
        "db.0.user": "u",
        "generation.max_tokens": 64,
    }
    for value in ("hf_abc", "k", "s", "p"):
        assert value not in flat.values()


def test_flatten_of_a_real_sweep_keeps_every_field():
    sweep = SweepConfig(name="s", data={"train": "t.jsonl"}, search={"baselines": [{"lora.r": 8}]})
    flat = flatten(sweep.model_dump(mode="json"))
    assert flat["name"] == "s"
    assert flat["lora.r"] == 16
    assert flat["lora.target_modules"] == "all-linear"
    assert flat["evaluation.tasks"] == "zorble"
    assert flat["search.asha.grace_steps"] == 10
    assert flat["search.baselines.0.lora.r"] == 8
    assert flat["tracking.experiment"] == "s"
    assert "base_dir" not in flat
    assert all("," not in k for k in flat)


@pytest.mark.parametrize(
    "name",
    [
        "hf_token",
        "HF_TOKEN",
        "token",
        "api_key",
        "api-key",
        "apikey",
        "apiKey",
        "OPENAI_API_KEY",
        "aws_secret_access_key",
        "client_secret",
        "password",
        "db_password",
        "passwd",
        "credentials",
        "mlflow.tracking.token",
    ],
)
def test_secret_names(name):
    assert is_secret(name)


@pytest.mark.parametrize(
    "name",
    [
        "tokenizer_name",
        "tokenizer",
        "max_tokens",
        "max_new_tokens",
        "tokens_per_second",
        "num_tokens",
        "keyword",
        "keys",
        "monkey",
        "secretary",
        "passage",
        "max_seq_length",
        "target_modules",
        "learning_rate",
        "name",
        "",
    ],
)
def test_names_that_only_contain_a_secret_word_are_not_secret(name):
    assert not is_secret(name)


@pytest.mark.parametrize("name", ["hfToken", "accessToken", "secretKey", "clientSecret"])
def test_camel_case_secret_names(name):
    assert is_secret(name)
