"""What the Hugging Face hub and its local cache can give: probed without downloading anything."""

from __future__ import annotations

import os
from pathlib import Path

TRUTHY = {"1", "on", "yes", "true"}


def env_flag(*names: str) -> bool:
    return any(os.environ.get(name, "").strip().lower() in TRUTHY for name in names)


def hub_dataset_cached(dataset_id: str) -> bool:
    """Offline, `datasets` can load a hub dataset only from its own cache or the hub cache."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / ("datasets--" + dataset_id.replace("/", "--"))
    prepared = Path(datasets_config.HF_DATASETS_CACHE) / dataset_id.replace("/", "___")
    return hub.exists() or prepared.exists()


def hub_config(name: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else None


def is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
