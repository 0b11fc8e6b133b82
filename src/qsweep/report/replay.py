"""A logged trial back in memory: its adapter on the logged base, quantized as logged.

Provenance is checked before anything is scored: a base whose weights hash differently from the
logged one would silently give different numbers, so it is refused.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsweep import tracking
from qsweep.config.schema import QuantizationConfig, TrialConfig
from qsweep.train.models import resolve_model
from qsweep.train.provenance import (
    CONFIG_FILE,
    PROVENANCE_FILE,
    ProvenanceError,
    check_base,
    check_quantization,
    read_trial_config,
)


@dataclass
class LoggedTrial:
    run_id: str
    trial: TrialConfig
    provenance: dict[str, Any]
    adapter_dir: Path
    metrics: dict[str, float]


def fetch_logged_trial(uri: str, run_id: str, dest: Path | None = None, with_adapter: bool = True) -> LoggedTrial:
    """Downloads config.yaml (and the adapter, unless with_adapter is False) of a finished trial run."""
    from mlflow.exceptions import MlflowException

    mlflow_client = tracking.client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        raise ProvenanceError(f"RUN_ID {run_id!r} is not a run in {uri}") from None
    if run.data.tags.get("qsweep.outcome") != "finished":
        raise ProvenanceError(f"run {run_id} is not a finished qsweep trial (it has no adapter)")
    dest = Path(dest or tempfile.mkdtemp(prefix=f"qsweep-{run_id[:8]}-"))
    config_file = Path(mlflow_client.download_artifacts(run_id, CONFIG_FILE, str(dest)))
    adapter_dir = Path(mlflow_client.download_artifacts(run_id, "adapter", str(dest))) if with_adapter else dest
    trial, provenance = read_trial_config(config_file)
    return LoggedTrial(run_id, trial, provenance, adapter_dir, dict(run.data.metrics))


def load_adapter(adapter_dir: Path, model_name: str, quantization: QuantizationConfig, base_dir: Path = Path("."),
                 revision: str | None = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A saved adapter on its base, refused unless the base's weights and the quantization are the
    ones it was trained with; the base in 4 bit exactly as the trial had it (kbit preparation too)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from qsweep.train.trial import load_base

    if not (adapter_dir / PROVENANCE_FILE).exists():
        raise ProvenanceError(f"{adapter_dir} has no {PROVENANCE_FILE}: it was not saved by this qsweep, so its "
                              "base model and quantization cannot be checked")
    logged = json.loads((adapter_dir / PROVENANCE_FILE).read_text())
    model_info = resolve_model(model_name, revision, base_dir)
    check_base(model_info.content_hash, logged)
    check_quantization(quantization, logged["quantization"])
    model, tokenizer = load_base(model_info.path, quantization, trust_remote_code)
    # The trial scored its model after prepare_model_for_kbit_training (norms upcast to fp32);
    # doing the same here makes the reloaded logits match, not just come close.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer


def load_trained(trial: TrialConfig, adapter_dir: Path, base_dir: Path) -> tuple[Any, Any]:
    """A logged trial's adapter on the base and quantization its config names, with the chat
    template it was trained and scored with (data.chat_template, when set)."""
    from qsweep.train.chat import read_template, use_template

    model, tokenizer = load_adapter(adapter_dir, trial.model.name, trial.quantization, base_dir, trial.model.revision,
                                    trial.model.trust_remote_code)
    return model, use_template(tokenizer, read_template(trial.data.chat_template, base_dir))
