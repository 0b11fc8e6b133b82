"""What travels with every saved adapter: the base it was trained on and how that base was quantized.

Written by training, checked by whoever loads the adapter: a base whose weights hash differently from
the logged one would silently give different numbers, so it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from qsweep.config.schema import QuantizationConfig, TrialConfig

PROVENANCE_FILE = "qsweep.json"
# Each trial's resolved config plus a `provenance` section, in its folder and on its MLflow run.
CONFIG_FILE = "config.yaml"


class ProvenanceError(ValueError):
    pass


def check_base(model_hash: str, logged: dict[str, Any]) -> None:
    if model_hash != logged["model_hash"]:
        raise ProvenanceError(
            f"the base model's weights hash to {model_hash[:12]}…, but the adapter was trained on "
            f"{logged['model_hash'][:12]}…; point model.name at the exact base it was trained on"
        )


def check_quantization(quantization: QuantizationConfig, logged: dict[str, Any]) -> None:
    asked = quantization.model_dump(mode="json")
    differ = {k: (asked[k], v) for k, v in logged.items() if asked.get(k) != v}
    if differ:
        detail = ", ".join(f"quantization.{k} = {a!r} (trained with {t!r})" for k, (a, t) in differ.items())
        raise ProvenanceError(f"the adapter was trained on a differently quantized base: {detail}; "
                              "load it with the quantization it was trained with")


def write_provenance(adapter_dir: Path, model_name: str, model_hash: str, quantization: QuantizationConfig) -> None:
    """Travels with every saved adapter, so whoever loads it can be told if the base is not the one."""
    (adapter_dir / PROVENANCE_FILE).write_text(json.dumps(
        {"model_name": model_name, "model_hash": model_hash, "quantization": quantization.model_dump(mode="json")},
        indent=2))


def read_trial_config(path: Path) -> tuple[TrialConfig, dict[str, Any]]:
    """A trial's logged config.yaml: the trial it ran and its provenance (model hash, base_dir...)."""
    logged = yaml.safe_load(Path(path).read_text())
    provenance = logged.pop("provenance")
    return TrialConfig(**logged), provenance
