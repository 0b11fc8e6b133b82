"""The model: a folder holding its config.json and tokenizer, read without building or downloading
weights, and LoRA target modules that exist in it.

An embedded model already built is read from qsweep's cache; one not built yet gets a skeleton
(config.json + tokenizer, no weights) written into the caller's scratch folder, so validating never
writes to the cache. The exception: SmolLM2's skeleton is read from its GGUF file, and when that
file is not on this machine yet the model is built as before (a one-time download and build).
"""

from __future__ import annotations

from pathlib import Path

from qsweep.config.paths import existing_path
from qsweep.config.schema import SweepConfig
from qsweep.preflight.hub import env_flag, hub_config, is_repo_id
from qsweep.search.space import SearchSpace
from qsweep.train.models import EMBEDDED, build_embedded, built_embedded, embedded_skeleton, resolve_model
from qsweep.train.targets import TargetModuleError, expert_parameter_names, linear_module_names, resolve_targets


def _embedded_folder(name: str, scratch: Path) -> Path:
    return built_embedded(name) or embedded_skeleton(name, scratch / name) or resolve_model(name).path


def build_embedded_model(sweep: SweepConfig) -> None:
    """For a sweep about to run: build its embedded model into the cache before validating, where
    the run would build it right after anyway. Validating against a skeleton first reads SmolLM2's
    GGUF twice (14 s of a 2-core machine's first sweep). A build that fails leaves the skeleton's
    path to validation, which reports why."""
    if sweep.model.name in EMBEDDED and built_embedded(sweep.model.name) is None:
        build_embedded(sweep.model.name)


def model_folder(sweep: SweepConfig, scratch: Path) -> tuple[Path | None, list[str]]:
    """The folder holding the model's config.json, if it can be had without downloading."""
    name, where = sweep.model.name, "model.name"
    if name in EMBEDDED:
        try:
            return _embedded_folder(name, scratch), []
        except Exception as exc:  # noqa: BLE001 - building an embedded model can fail many ways; report, don't crash
            return None, [f"{where}: cannot build the embedded model {name!r} ({type(exc).__name__}: {exc}); "
                          "run once while online, or give a local model folder"]
    local = existing_path(name, sweep.base_dir)
    if local.exists():
        if not (local / "config.json").is_file():
            return None, [f"{where}: folder {local.resolve()} has no config.json; point it at a folder written by "
                          "save_pretrained"]
        return local, []
    if not is_repo_id(name):
        return None, [f"{where}: {name!r} is not an embedded model ({', '.join(EMBEDDED)}), an existing folder "
                      "(relative to the sweep file), or a hub id; fix the path or the name"]
    cached = hub_config(name, sweep.model.revision)
    if cached is None and env_flag("HF_HUB_OFFLINE"):
        return None, [f"{where}: {name!r} cannot be found offline: it is not an embedded model "
                      f"({', '.join(EMBEDDED)}), not a folder next to the sweep file, and not in the Hugging Face "
                      "cache, and HF_HUB_OFFLINE=1 forbids downloading it; download it once while online "
                      f"(hf download {name}) or set model.name to a local folder holding the model "
                      "(relative to the sweep file)"]
    return cached, []  # None online and not cached: the download happens at run time


def check_targets(sweep: SweepConfig, space: SearchSpace | None, folder: Path) -> list[str]:
    try:
        names = linear_module_names(folder, sweep.model.trust_remote_code)
        experts = expert_parameter_names(folder, sweep.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any config the model classes reject is a model.name problem
        return [f"model.name: cannot read the model's config in {folder} ({type(exc).__name__}: {exc}); "
                "check the folder, or set model.trust_remote_code: true if it needs custom code"]
    candidates = [("lora.target_modules", sweep.lora.target_modules)]
    if space and "lora.target_modules" in space.params:
        candidates += [(f"search.space params.lora.target_modules = {v!r}", v)
                       for v in space.params["lora.target_modules"].edge_values() if isinstance(v, (str, list))]
    problems = []
    for where, spec in candidates:
        try:
            resolve_targets(spec, names, experts)
        except TargetModuleError as exc:
            problems.append(f"{where}: {exc}")
    return problems
