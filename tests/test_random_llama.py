"""The real-size random Llamas the GPU benchmarks train: their shapes are the published models'."""

from __future__ import annotations

import pytest

from qsweep.config.schema import SweepConfig
from qsweep.resources.estimate import estimate_trial_memory
from qsweep.train.models import EMBEDDED, random_llama_config

# Parameter counts of the published models (their model cards / safetensors index).
PUBLISHED = {"random-llama-1b": 1_235_814_400, "random-llama-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_random_llama_has_the_published_models_shape(name, tmp_path, tiny_sweep_dict):
    assert name in EMBEDDED
    random_llama_config(name).save_pretrained(tmp_path)
    estimate = estimate_trial_memory(SweepConfig(**tiny_sweep_dict).trial(), tmp_path, "cuda")
    assert estimate.quantized_param_count + estimate.unquantized_param_count == PUBLISHED[name]
