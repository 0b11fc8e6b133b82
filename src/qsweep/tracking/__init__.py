"""MLflow: one parent run per sweep, one child run per trial, all written by the driver.

Only the driver process writes to MLflow. Trials send results back through Ray, so many trials
never race on one sqlite file ("database is locked") and a tracking server sees one client.
Imports config and search only (ray_callback is the Ray Tune side; state ties an output folder to its
parent run); never trains or scores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

SECRET_WORDS = {"token", "key", "secret", "password", "passwd", "credential", "credentials", "apikey"}
MAX_PARAM_LENGTH = 6000

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


LOCK_RETRIES = 8
# MLflow's marker of an experiment that holds training runs (params and metrics side by side), not
# GenAI traces; MLflow 3.17's UI itself picks its view from a toggle (see training_view_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# The run's description in MLflow's UI (markdown).
DESCRIPTION_TAG = "mlflow.note.content"


class RetryingClient:
    """An MlflowClient whose calls retry while a sqlite store is locked by another writer.

    The driver is the only writer of a sweep, but a second sweep or a `qsweep` command on the same
    sqlite file can still hold the lock past sqlite's busy timeout; a dropped write would be a lost
    param or metric, so the call waits and tries again instead.
    """

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(LOCK_RETRIES):
                try:
                    return method(*args, **kwargs)
                except Exception as exc:
                    if "database is locked" not in str(exc) or attempt == LOCK_RETRIES - 1:
                        raise
                    time.sleep(0.2 * 2**attempt)

        return call


def client(uri: str) -> Any:
    return RetryingClient(uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Creates the schema and the experiment once, here in the driver, before any trial starts.

    The experiment is marked as training runs; a kind someone set on an existing one is kept.
    """
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        return mlflow_client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


LOCAL_UI = "http://127.0.0.1:5000"


def training_view_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's training view, on the tracking server or on a local
    `mlflow ui`. MLflow 3.17's UI picks the view from this URL parameter (or its sidebar toggle,
    remembered per browser), not from the experiment tag."""
    server = uri if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def is_secret(name: str) -> bool:
    """hf_token, apiKey, aws_secret_access_key, password: any word of the name is a secret word."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return any(word in SECRET_WORDS for word in re.split(r"[^a-z0-9]+", words))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config → `a.b.c` keys; secrets are dropped, never logged."""
    flat: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if is_secret(str(key)):
                continue
            flat.update(flatten(value, name))
    elif isinstance(data, (list, tuple)) and data and all(not isinstance(v, (dict, list)) for v in data):
        flat[prefix] = ",".join(str(v) for v in data)
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            flat.update(flatten(value, f"{prefix}.{index}"))
    else:
        flat[prefix] = data
    return flat


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]


def _metrics(values: dict[str, float], step: int = 0) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def log_batch(mlflow_client: Any, run_id: str, params: dict | None = None, metrics: dict | None = None,
              step: int = 0, tags: dict | None = None) -> None:
    from mlflow.entities import RunTag

    params_list = _params(params or {})
    metric_list = _metrics(metrics or {}, step)
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    # MLflow accepts at most 100 params per call.
    for start in range(0, max(len(params_list), 1), 100):
        mlflow_client.log_batch(
            run_id,
            params=params_list[start:start + 100],
            metrics=metric_list if start == 0 else [],
            tags=tag_list if start == 0 else [],
        )


def start_run(mlflow_client: Any, experiment_id: str, name: str, tags: dict[str, str]) -> str:
    run = mlflow_client.create_run(experiment_id, run_name=name, tags={"mlflow.runName": name, **tags})
    return run.info.run_id


def log_files(mlflow_client: Any, run_id: str, files: Iterable[Path], folders: dict[str, Path]) -> None:
    for path in files:
        mlflow_client.log_artifact(run_id, str(path))
    for artifact_path, folder in folders.items():
        mlflow_client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)


def log_dict(mlflow_client: Any, run_id: str, data: dict, name: str) -> None:
    mlflow_client.log_text(run_id, json.dumps(data, indent=2, default=str), name)


def end_run(mlflow_client: Any, run_id: str, status: str, reason: str | None = None) -> None:
    if reason:
        mlflow_client.set_tag(run_id, "qsweep.reason", reason[-5000:])
    mlflow_client.set_terminated(run_id, status=status)


def trial_runs(mlflow_client: Any, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The latest child run of each trial of a sweep, by Ray trial id."""
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"], max_results=10000,
    )
    return {r.data.tags.get("qsweep.trial_id"): r for r in runs}
