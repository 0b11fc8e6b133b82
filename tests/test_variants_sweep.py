"""A real sweep of the LoRA variants: a tied alpha (ratio_of), DoRA, rsLoRA, LoRA+, NEFTune and
layers_to_transform, trained for epochs with ASHA on, logged to MLflow and reproduced from it."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from sweep_bench import SweepBench

pytestmark = pytest.mark.slow

KEY = "lora.alpha-per-lora.r"
# zorble's 93 training rows in batches of 4: 24 steps an epoch, 3 steps in 0.1 of one.
STEPS = 3


@pytest.fixture(scope="module")
def variants_sweep(tmp_path_factory, tiny_sweep_base, sweep_bench) -> dict:
    workdir = tmp_path_factory.mktemp("variants")
    (workdir / "space.yaml").write_text(yaml.safe_dump({"params": {
        "lora.r": {"choices": [4, 8]},
        "lora.alpha": {"ratio_of": "lora.r", "choices": [1, 2]},
        "lora.use_dora": {"choices": [True, False]},
    }}, sort_keys=False))
    sweep = copy.deepcopy(tiny_sweep_base)
    sweep["lora"] = {"use_rslora": True, "layers_to_transform": "1", "dropout": 0.0}
    sweep["training"] = {"num_epochs": 0.1, "batch_size": 4, "eval_every": 1, "loraplus_lr_ratio": 4,
                         "neftune_noise_alpha": 5}
    sweep["search"] = {**sweep["search"], "space": str(workdir / "space.yaml"), "num_trials": 2,
                       "asha": {"grace_steps": 1},
                       "baselines": [{"lora.r": 8, "lora.alpha": 16, "lora.use_dora": True},
                                     {"lora.r": 4, "lora.alpha": 4, "lora.use_dora": False}]}
    path = sweep_bench.write(workdir, sweep, experiment="variants")
    result = sweep_bench.invoke("run", path)
    return {"result": result, "uri": sweep["tracking"]["uri"], "path": path}


def test_the_sweep_trains_every_variant_for_its_epochs(variants_sweep):
    result = variants_sweep["result"]
    assert result.exit_code == 0, result.output
    assert "finished 2, stopped early 0, failed 0" in result.output
    # The plain progress lines count each trial's steps against its epochs' total.
    assert re.search(rf"step 1/{STEPS}, val loss", result.output), result.output


def test_mlflow_holds_the_ratio_the_value_and_the_steps(variants_sweep):
    runs = SweepBench.runs(variants_sweep["uri"], "variants")
    assert len(runs) == 2
    seen = set()
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        r, ratio = int(params["lora.r"]), int(params[f"search.{KEY}"])
        assert float(params["lora.alpha"]) == r * ratio
        seen.add((r, ratio, params["lora.use_dora"]))
        assert (params["lora.use_rslora"], params["lora.layers_to_transform"]) == ("True", "1")
        assert (params["training.loraplus_lr_ratio"], params["training.neftune_noise_alpha"]) == ("4.0", "5.0")
        assert (params["training.num_epochs"], params["training.max_steps"]) == ("0.1", "None")
        assert params["total_steps"] == str(STEPS) and metrics["train_steps"] == STEPS
    assert seen == {(8, 2, "True"), (4, 1, "False")}
    (parent,) = SweepBench.runs(variants_sweep["uri"], "variants", kind="sweep")
    assert parent.data.params["search.asha.max_t"] == str(STEPS)


def test_show_writes_back_a_sweep_that_validates(variants_sweep, tmp_path):
    run = SweepBench.runs(variants_sweep["uri"], "variants")[0]
    shown = SweepBench.invoke("show", run.info.run_id, "--tracking-uri", variants_sweep["uri"])
    assert shown.exit_code == 0, shown.output
    config = yaml.safe_load(shown.output)
    assert config["training"]["num_epochs"] == 0.1 and config["training"].get("max_steps") is None
    assert config["lora"]["alpha"] == config["lora"]["r"] * float(run.data.params[f"search.{KEY}"])
    path = tmp_path / "shown.yaml"
    path.write_text(shown.output)
    validated = SweepBench.invoke("validate", path)
    assert validated.exit_code == 0, validated.output
