"""`qsweep estimate`, run as a user runs it: the figures it prints for a sweep, and exit code 2 with
the field named for a broken one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qsweep.cli import app

COMPONENTS = ("quantized_weights", "unquantized_weights", "lora_params", "lora_grads", "optimizer_state",
              "activations", "runtime_overhead", "heap_slack")


@pytest.fixture
def sweep_file(tmp_path: Path, tiny_sweep_dict: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep_dict))
    return path


def _peft_lora_params(model_path: Path, r: int, targets: list[str]) -> int:
    """What peft itself creates for this LoRA config: the oracle for the estimate's LoRA count."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), LoraConfig(r=r, target_modules=targets))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_estimate_prints_each_trials_figures(sweep_file: Path, tiny_sweep_dict: dict, tiny_llama: Path):
    from qsweep.config.schema import SweepConfig
    from qsweep.train.targets import linear_module_names, resolve_target_modules

    runner = CliRunner()
    as_json = runner.invoke(app, ["estimate", str(sweep_file), "--device", "cpu", "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    figures = json.loads(as_json.output)
    assert figures["device"] == "cpu" and set(figures["trials"]) == {"baseline", "smallest", "largest"}
    for name, trial in figures["trials"].items():
        assert trial["total"] == pytest.approx(sum(trial[c] for c in COMPONENTS)), name
        assert 0 < trial["total"] <= trial["budget_mb"] + trial["runtime_overhead"], name
    totals = {name: trial["total"] for name, trial in figures["trials"].items()}
    assert totals["smallest"] <= totals["baseline"] <= totals["largest"]

    lora = SweepConfig(**tiny_sweep_dict).trial().lora
    targets = resolve_target_modules(lora.target_modules, linear_module_names(tiny_llama))
    assert figures["trials"]["baseline"]["lora_param_count"] == _peft_lora_params(tiny_llama, lora.r, targets)

    table = runner.invoke(app, ["estimate", str(sweep_file), "--device", "cpu"])
    assert table.exit_code == 0, table.output
    lines = table.output.replace("┃", "│").splitlines()  # rich draws the header with heavier bars
    rows = {cells[0]: cells[1:] for line in lines
            if len(cells := [cell.strip() for cell in line.strip("│ ").split("│")]) == 4}
    assert rows["component"] == ["baseline", "smallest", "largest"]
    for field in (*COMPONENTS, "total", "budget_mb"):
        assert rows[field] == [f"{figures['trials'][name][field]:,.1f}" for name in rows["component"]], field


def test_estimate_of_a_broken_sweep_exits_2_naming_the_field(tmp_path: Path, tiny_sweep_dict: dict):
    tiny_sweep_dict["lora"] = {"r": 0}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep_dict))
    result = CliRunner().invoke(app, ["estimate", str(path), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "lora.r" in result.output and "Traceback" not in result.output
