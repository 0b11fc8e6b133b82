"""Preflight checks added with the split of validate: nothing written to the cache, the validation
split, completions that cannot fit, and the skeleton model folder matching the built one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qsweep.cli import app


def _validate(sweep: dict, folder: Path) -> tuple[int, str]:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_validate_writes_nothing_to_an_empty_cache(tiny_sweep_dict: dict, workdir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("QSWEEP_CACHE", str(cache))
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 0, output
    assert not cache.exists(), sorted(p.name for p in cache.rglob("*"))


def test_a_completion_longer_than_max_seq_length_is_reported(tiny_sweep_dict: dict, workdir: Path, tmp_path: Path):
    tiny_sweep_dict["data"].update({"completion": " {question} so {answer}", "max_seq_length": 8})
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 2, output
    assert "data.train: the completion of line 1 (" in output and "data.validation: the completion of" in output
    assert "raise data.max_seq_length to at least" in output


def test_a_validation_split_the_dataset_lacks_is_reported(tiny_sweep_dict: dict, workdir: Path, tmp_path: Path,
                                                          zorble_dir: Path):
    folder = tmp_path / "zorble_ds"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text((zorble_dir / f"{split}.jsonl").read_text())
    tiny_sweep_dict["data"].update({"train": "zorble_ds", "validation": "zorble_ds"})
    assert _validate(tiny_sweep_dict, tmp_path)[0] == 0
    tiny_sweep_dict["data"]["validation_split"] = "test"
    code, output = _validate(tiny_sweep_dict, tmp_path)
    assert code == 2, output
    assert "data.validation_split: 'zorble_ds' has no split 'test' (its splits: train, validation)" in output


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_an_embedded_skeleton_has_the_built_models_layers_and_tokenizer(name: str, tmp_path: Path):
    from transformers import AutoTokenizer

    from qsweep.train.models import embedded_skeleton, resolve_model
    from qsweep.train.targets import linear_module_names

    built = resolve_model(name).path
    skeleton = embedded_skeleton(name, tmp_path / name)
    assert not list(skeleton.glob("*.safetensors"))
    assert linear_module_names(skeleton) == linear_module_names(built)
    text = "Q: What is the zorble of 41?\nA: 125"
    ids = [AutoTokenizer.from_pretrained(folder)(text)["input_ids"] for folder in (skeleton, built)]
    assert ids[0] == ids[1]
