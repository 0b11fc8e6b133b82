"""The 4-bit base quantized once per machine (train.quantized): stored by the first load, loaded as
stored by the next ones, bit-identical to quantizing again, and never at the cost of a trial."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from qsweep.config.schema import QuantizationConfig, SweepConfig
from qsweep.train.trial import load_base, run_trial

STORED = "4-bit base loaded as stored"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def quant_state_tensors(model) -> dict[str, torch.Tensor]:
    found = {}
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            found.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items() if torch.is_tensor(v)})
    return found


def assert_same_model(a, b) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left)
    left_state, right_state = quant_state_tensors(a), quant_state_tensors(b)
    assert left_state and left_state.keys() == right_state.keys()
    assert all(torch.equal(left_state[k], right_state[k]) for k in left_state)
    tokens = torch.randint(0, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_second_load_is_the_stored_base_and_identical(tiny_llama: Path, cache: Path, caplog, quant_type, double_quant):
    quant = QuantizationConfig(quant_type=quant_type, double_quant=double_quant)
    with caplog.at_level(logging.INFO, logger="qsweep"):
        quantized_here, _ = load_base(tiny_llama, quant)
        assert STORED not in caplog.text
        stored = list((cache / "quantized").iterdir())
        assert len(stored) == 1 and (stored[0] / "config.json").exists()
        loaded, tokenizer = load_base(tiny_llama, quant)
    assert STORED in caplog.text
    assert tokenizer.pad_token_id is not None
    assert_same_model(quantized_here, loaded)


def test_each_setting_has_its_own_stored_base(tiny_llama: Path, cache: Path):
    load_base(tiny_llama, QuantizationConfig(quant_type="nf4"))
    load_base(tiny_llama, QuantizationConfig(quant_type="fp4"))
    load_base(tiny_llama, QuantizationConfig(quant_type="nf4", double_quant=False))
    load_base(tiny_llama, QuantizationConfig(quant_type="nf4"))
    assert len(list((cache / "quantized").iterdir())) == 3


def test_a_half_written_store_is_ignored_and_replaced(tiny_llama: Path, cache: Path, caplog):
    quant = QuantizationConfig()
    load_base(tiny_llama, quant)
    (folder,) = (cache / "quantized").iterdir()
    (folder / "config.json").unlink()
    with caplog.at_level(logging.INFO, logger="qsweep"):
        load_base(tiny_llama, quant)
    assert STORED not in caplog.text
    assert (folder / "config.json").exists()


def test_a_cache_that_cannot_be_written_costs_the_speed_not_the_load(tiny_llama: Path, cache: Path, caplog):
    cache.mkdir(parents=True)
    (cache / "quantized").write_text("a file where the folder would go")
    with caplog.at_level(logging.WARNING, logger="qsweep"):
        model, _ = load_base(tiny_llama, QuantizationConfig())
    assert "could not store the 4-bit base" in caplog.text
    assert model.config.quantization_config.load_in_4bit


def test_a_trial_on_the_stored_base_trains_and_scores_exactly_as_on_a_fresh_one(
        tiny_sweep_dict: dict, cache: Path, tmp_path: Path, caplog):
    trial = SweepConfig(**tiny_sweep_dict).trial()
    base_dir = Path(tiny_sweep_dict["data"]["train"]).parent
    fresh = run_trial(trial, base_dir, tmp_path / "fresh", report=lambda _: None)
    with caplog.at_level(logging.INFO, logger="qsweep"):
        again = run_trial(trial, base_dir, tmp_path / "again", report=lambda _: None)
    assert STORED in caplog.text
    assert again.metrics["train_loss"] == fresh.metrics["train_loss"]
    assert again.curve == fresh.curve
    assert again.scores == fresh.scores


def test_an_unreadable_store_is_replaced_not_fatal(tiny_llama: Path, cache: Path, caplog):
    quant = QuantizationConfig()
    reference, _ = load_base(tiny_llama, quant)
    (folder,) = (cache / "quantized").iterdir()
    (folder / "model.safetensors").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="qsweep"):
        model, _ = load_base(tiny_llama, quant)
    assert "unreadable" in caplog.text
    assert_same_model(reference, model)
    again, _ = load_base(tiny_llama, quant)
    assert_same_model(reference, again)


def test_a_base_loaded_to_be_saved_is_quantized_here_and_saves(tiny_llama: Path, cache: Path, tmp_path: Path, caplog):
    quant = QuantizationConfig()
    stored, _ = load_base(tiny_llama, quant)
    load_base(tiny_llama, quant)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qsweep"):
        savable, _ = load_base(tiny_llama, quant, savable=True)
    assert STORED not in caplog.text
    savable.save_pretrained(tmp_path / "saved")
    assert_same_model(stored, savable)
