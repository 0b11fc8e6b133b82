"""A logged trial back in memory: its adapter on the logged base, quantized as logged.

Provenance is checked before anything is scored: a base whose weights hash differently from the
logged one would silently give different numbers, so it is refused.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


def check_adapter(adapter_dir: Path, model_hash: str, quantization: QuantizationConfig) -> None:
    """Refuses an adapter unless the base's weights and the quantization are the ones it was trained with."""
    if not (adapter_dir / PROVENANCE_FILE).exists():
        raise ProvenanceError(f"{adapter_dir} has no {PROVENANCE_FILE}: it was not saved by this qsweep, so its "
                              "base model and quantization cannot be checked")
    logged = json.loads((adapter_dir / PROVENANCE_FILE).read_text())
    check_base(model_hash, logged)
    check_quantization(quantization, logged["quantization"])


def load_logged_base(trial: TrialConfig, base_dir: Path) -> tuple[Any, Any, str]:
    """The base a trial's config names, in 4 bit exactly as the trial had it before LoRA (kbit
    preparation too), its tokenizer, and its weights hash."""
    from peft import prepare_model_for_kbit_training

    from qsweep.train.chat import read_template
    from qsweep.train.trial import load_base

    model_info = resolve_model(trial.model.name, trial.model.revision, base_dir)
    model, tokenizer = load_base(model_info.path, trial.quantization, trial.model.trust_remote_code,
                                 chat_template=read_template(trial.data.chat_template, base_dir))
    # The trial scored its model after prepare_model_for_kbit_training (norms upcast to fp32);
    # doing the same here makes the reloaded logits match, not just come close.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.eval()
    return model, tokenizer, model_info.content_hash


def each_adapter(base: Any, adapters: dict[str, Path]) -> Iterator[tuple[str, Any]]:
    """Each adapter in turn on one loaded base (peft's load_adapter / set_adapter), the model with
    only that adapter active; the one before it is deleted, so at most two are held at once. What
    LoRA adds is computed per active adapter, so each scores as it would alone on a fresh base."""
    from peft import PeftModel

    model, previous = None, None
    for name, adapter_dir in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=name)
        else:
            model.load_adapter(adapter_dir, adapter_name=name)
            model.set_adapter(name, inference_mode=True)
            model.delete_adapter(previous)
        model.eval()
        previous = name
        yield name, model


def load_trained_on_one_base(trials: dict[str, tuple[TrialConfig, Path]], base_dir: Path
                             ) -> tuple[Any, Iterator[tuple[str, Any]]]:
    """Logged trials that share a base and its quantization: (the base and its tokenizer, loaded
    once, then each trial's adapter on it in turn). Every adapter's provenance is checked before the
    base is loaded."""
    first = next(iter(trials.values()))[0]
    model_hash = resolve_model(first.model.name, first.model.revision, base_dir).content_hash
    for trial, adapter_dir in trials.values():
        if (trial.model, trial.quantization) != (first.model, first.quantization):
            raise ValueError(f"{adapter_dir}: trained on another base or quantization than {first.quantization}")
        check_adapter(adapter_dir, model_hash, trial.quantization)
    model, tokenizer, _ = load_logged_base(first, base_dir)
    return (model, tokenizer), each_adapter(model, {name: adapter for name, (_, adapter) in trials.items()})


def load_trained(trial: TrialConfig, adapter_dir: Path, base_dir: Path) -> tuple[Any, Any]:
    """A logged trial's adapter on the base and quantization its config names, refused unless they
    are the ones it was trained with."""
    (_, tokenizer), adapters = load_trained_on_one_base({"default": (trial, adapter_dir)}, base_dir)
    return next(adapters)[1], tokenizer
