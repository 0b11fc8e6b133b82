"""A model's structure (linear layers, shapes) read once per machine and stored (train.structure)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from qsweep.resources.estimate import model_shape, read_model_shape
from qsweep.train import structure
from qsweep.train.targets import _linear_module_names


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path / "cache"))
    model_shape.cache_clear()
    _linear_module_names.cache_clear()
    yield tmp_path / "cache" / "structure"
    model_shape.cache_clear()
    _linear_module_names.cache_clear()


def _stored(store: Path, kind: str) -> list[Path]:
    return sorted(store.glob(f"{kind}-*.json"))


def test_the_stored_shape_is_the_shape_read_from_the_model(store, tiny_llama, tiny_gpt2):
    for path in (tiny_llama, tiny_gpt2):
        read = read_model_shape(path)
        assert model_shape(path) == read  # read, then stored
        model_shape.cache_clear()
        assert model_shape(path) == read  # from the store
    assert len(_stored(store, "shape")) == 2


def test_linear_names_come_from_the_store_once_read(store, tiny_llama):
    read = _linear_module_names(tiny_llama, False)
    assert "model.layers.0.self_attn.q_proj" in read and "lm_head" not in read
    assert json.loads(_stored(store, "linear-names")[0].read_text()) == list(read)
    _linear_module_names.cache_clear()
    (stored,) = _stored(store, "linear-names")
    stored.write_text(json.dumps(["only.this"]))
    # Proof that the store is what answers now: what it holds comes back.
    assert _linear_module_names(tiny_llama, False) == ("only.this",)


def test_another_config_or_transformers_version_is_another_key(tmp_path, tiny_llama):
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    assert structure.structure_key(tiny_llama, "shape") != structure.structure_key(other, "shape")
    assert structure.structure_key(tiny_llama, "shape") != structure.structure_key(tiny_llama, "linear-names")


def test_an_unreadable_store_is_read_again_and_replaced(store, tiny_llama, caplog):
    expected = read_model_shape(tiny_llama)
    model_shape(tiny_llama)
    model_shape.cache_clear()
    (stored,) = _stored(store, "shape")
    stored.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="qsweep.train.structure"):
        assert model_shape(tiny_llama) == expected
    assert "unreadable" in caplog.text
    assert json.loads(stored.read_text())["hidden"] == expected.hidden


def test_a_store_that_cannot_be_written_costs_only_the_speed(tmp_path, monkeypatch, tiny_llama, caplog):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "structure").write_text("a file where the store's folder should be")
    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path / "cache"))
    model_shape.cache_clear()
    with caplog.at_level(logging.WARNING, logger="qsweep.train.structure"):
        assert model_shape(tiny_llama) == read_model_shape(tiny_llama)
    model_shape.cache_clear()
    assert "could not store" in caplog.text


def test_a_model_with_remote_code_is_never_stored(store, tiny_llama):
    calls = []
    assert structure.read_once("shape", tiny_llama, True, lambda: calls.append(1) or {"read": len(calls)}) == {"read": 1}
    assert structure.read_once("shape", tiny_llama, True, lambda: calls.append(1) or {"read": len(calls)}) == {"read": 2}
    assert not store.exists()


def test_a_cache_that_does_not_exist_yet_is_not_created(tmp_path, monkeypatch, tiny_llama):
    """Only what builds into the cache creates it: `qsweep validate` on a fresh machine writes nothing."""
    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path / "nothing-yet"))
    model_shape.cache_clear()
    assert model_shape(tiny_llama) == read_model_shape(tiny_llama)
    model_shape.cache_clear()
    assert not (tmp_path / "nothing-yet").exists()
