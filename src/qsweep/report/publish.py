"""From a trial to production: a re-runnable sweep file, a registry version, an exported folder.

`mlflow.register_model("runs:/ID/adapter")` refuses a folder logged with log_artifacts, so the
registered model and its version are created with the client directly (source = the artifact URI).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from qsweep import tracking
from qsweep.config.paths import resolve_path
from qsweep.config.schema import dump_yaml
from qsweep.report.replay import LoggedTrial
from qsweep.train.provenance import PROVENANCE_FILE

RESERVED_ALIASES = {"latest"}


class PublishError(ValueError):
    pass


def scores_of(logged: LoggedTrial) -> dict[str, float]:
    """Its scores, and the final stage's (`final/...`, the guard of evaluation.final.tasks among them)
    when it was a finalist."""
    evaluation = logged.trial.evaluation
    tasks = [*evaluation.tasks, *(evaluation.final.tasks if evaluation.final else [])]
    return {k: v for k, v in logged.metrics.items() if k.removeprefix("final/").split("/")[0] in tasks}


def absolute_paths(logged: LoggedTrial) -> dict[str, Any]:
    """The trial config with data and task paths made absolute: the file may be run from anywhere."""
    base_dir = Path(logged.provenance.get("base_dir", "."))
    config = logged.trial.model_dump(mode="json")
    for key in ("train", "validation"):
        value = config["data"].get(key)
        if value and (path := resolve_path(value, base_dir)).exists():
            config["data"][key] = str(path)
    config["evaluation"]["include_path"] = [str(resolve_path(p, base_dir))
                                            for p in config["evaluation"]["include_path"]]
    return config


def sweep_search(uri: str, run_id: str) -> tuple[str, str, str]:
    """(sweep name, metric, direction) of a trial's sweep: the direction is on its parent run."""
    mlflow_client = tracking.client(uri)
    tags = mlflow_client.get_run(run_id).data.tags
    parent = tags.get("mlflow.parentRunId")
    direction = mlflow_client.get_run(parent).data.tags.get("qsweep.direction", "maximize") if parent else "maximize"
    return tags.get("qsweep.sweep", "trial"), tags.get("qsweep.metric", ""), direction


def single_trial_sweep(logged: LoggedTrial, uri: str) -> str:
    """YAML that `qsweep run` accepts and that re-trains exactly this trial's config."""
    sweep_name, metric, direction = sweep_search(uri, logged.run_id)
    config = absolute_paths(logged)
    config = {
        "name": f"{sweep_name}-rerun-{logged.run_id[:8]}",
        **config,
        "search": {"space": None, "num_trials": 1, "metric": metric, "direction": direction,
                   "asha": {"enabled": False}},
        "tracking": {"uri": uri},
    }
    header = [f"# qsweep show {logged.run_id}: a trial of sweep {sweep_name!r}; `qsweep run` on this file re-trains it",
              f"# base model sha256 {logged.provenance.get('model_hash')}",
              f"# data sha256 {logged.provenance.get('data_hash')}",
              f"# target modules as resolved: {', '.join(logged.provenance.get('target_modules_resolved', []))}",
              "# scores:"]
    header += [f"#   {name} = {value:.6g}" for name, value in sorted(logged.metrics.items())]
    return "\n".join(header) + "\n" + dump_yaml(config)


def registry_name(logged: LoggedTrial) -> str:
    """Named after the base model and the task, as the registry's readers search for them."""
    base = Path(logged.trial.model.name).name
    task = logged.trial.evaluation.tasks[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}-{task}-qlora")


def _version_tags(logged: LoggedTrial) -> dict[str, str]:
    trial = logged.trial
    tags = {
        "base_model": trial.model.name,
        "base_model_hash": str(logged.provenance.get("model_hash")),
        "data_hash": str(logged.provenance.get("data_hash")),
        "quant_type": trial.quantization.quant_type,
        "double_quant": str(trial.quantization.double_quant),
        "compute_dtype": str(logged.provenance.get("compute_dtype")),
        "lora_r": str(trial.lora.r),
        "lora_alpha": str(trial.lora.alpha),
        "target_modules": ",".join(logged.provenance.get("target_modules_resolved", [])),
        "learning_rate": str(trial.training.learning_rate),
    }
    tags.update({f"score.{k}": f"{v:.6g}" for k, v in scores_of(logged).items()})
    return tags


def promote(uri: str, logged: LoggedTrial, alias: str) -> tuple[str, str]:
    """Registers the adapter as a new version of its model and points the alias at it."""
    if alias in RESERVED_ALIASES or re.fullmatch(r"v\d+", alias):
        raise PublishError(f"--alias {alias!r} is reserved by MLflow; choose another, e.g. production")
    mlflow_client = tracking.client(uri)
    name = registry_name(logged)
    if not mlflow_client.search_registered_models(filter_string=f"name = '{name}'"):
        mlflow_client.create_registered_model(name, description=f"QLoRA adapters of {logged.trial.model.name}")
    run = mlflow_client.get_run(logged.run_id)
    version = mlflow_client.create_model_version(
        name, source=f"{run.info.artifact_uri}/adapter", run_id=logged.run_id, tags=_version_tags(logged),
        description=dump_yaml(logged.trial.model_dump(mode="json")),
    )
    mlflow_client.set_registered_model_alias(name, alias, version.version)
    return name, version.version


def chat_flags(evaluation: Any) -> str:
    """lm-eval's CLI flags that write the prompts as the trial's scores were (its base/ tokenizer
    holds the chat template the trial used)."""
    import shlex

    flags = " --apply_chat_template" if evaluation.apply_chat_template else ""
    if evaluation.apply_chat_template and evaluation.fewshot_as_multiturn is False:
        flags += " --fewshot_as_multiturn false"  # lm-eval turns it on with the template
    if evaluation.system_instruction is not None:
        flags += f" --system_instruction {shlex.quote(evaluation.system_instruction)}"
    return flags


def _length(training: Any) -> str:
    return f"{training.max_steps} steps" if training.max_steps is not None else f"{training.num_epochs:g} epochs"


def model_card(logged: LoggedTrial) -> str:
    trial = logged.trial
    scores = scores_of(logged)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(scores.items()))
    return f"""# QLoRA adapter for {trial.model.name}

Trained by qsweep (MLflow run `{logged.run_id}`). Load it on the 4-bit base it was trained on:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("base")   # 4-bit, quantization config included
model = PeftModel.from_pretrained(base, "adapter")
```

or score it with lm-eval (local task definitions, if any, are in `tasks/`):
`lm_eval --model hf --model_args pretrained=base,peft=adapter --include_path tasks --tasks {",".join(trial.evaluation.tasks)}{chat_flags(trial.evaluation)}`

## Scores

| metric | value |
|---|---|
{rows}

## Config

| | |
|---|---|
| base model | {trial.model.name} (sha256 {logged.provenance.get("model_hash")}) |
| quantization | {trial.quantization.quant_type}, double quant {trial.quantization.double_quant}, compute {logged.provenance.get("compute_dtype")} |
| LoRA | r {trial.lora.r}, alpha {trial.lora.alpha}, dropout {trial.lora.dropout}, targets {", ".join(logged.provenance.get("target_modules_resolved", []))} |
| training | {_length(trial.training)}, batch {trial.training.batch_size}, lr {trial.training.learning_rate}, {trial.training.lr_scheduler}, seed {trial.training.seed} |
| data | {trial.data.train} (sha256 {logged.provenance.get("data_hash")}) |

The full config is in `config.yaml`.
"""


def export(logged: LoggedTrial, base_model: Any, tokenizer: Any, dest: Path) -> Path:
    """Writes base/ (the 4-bit base as the trial used it) and adapter/ so both PeftModel and lm-eval's
    `pretrained=base,peft=adapter` load them with no extra arguments, plus a README card."""
    if dest.exists() and any(dest.iterdir()):
        raise PublishError(f"DIR {dest} is not empty; nothing was overwritten. Pick a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    base_model.save_pretrained(dest / "base")
    tokenizer.save_pretrained(dest / "base")
    shutil.copytree(logged.adapter_dir, dest / "adapter")
    adapter_config = dest / "adapter" / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = str((dest / "base").resolve())
    adapter_config.write_text(json.dumps(config, indent=2))
    provenance = {"run_id": logged.run_id, **logged.provenance,
                  "quantization": logged.trial.quantization.model_dump(mode="json")}
    (dest / "adapter" / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str))
    (dest / "config.yaml").write_text(dump_yaml(logged.trial.model_dump(mode="json")))
    (dest / "README.md").write_text(model_card(logged))
    write_local_tasks(logged, dest / "tasks")
    return dest


def write_local_tasks(logged: LoggedTrial, folder: Path) -> None:
    """The trial's local lm-eval tasks with absolute data paths, for `lm_eval --include_path`."""
    import yaml

    from qsweep.evaluate.harness import include_dirs, task_specs

    base_dir = Path(logged.provenance.get("base_dir", "."))
    specs = task_specs(logged.trial.evaluation.tasks, include_dirs(logged.trial.evaluation.include_path, base_dir))
    for spec in specs:
        if isinstance(spec, dict):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
